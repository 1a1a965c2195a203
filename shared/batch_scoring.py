"""Batch scoring of files larger than memory with an exported detector (``fedae detect``).

A CSV, Parquet or NPZ file with the bundle's input schema is read in chunks of ``chunk_rows`` rows, each
chunk's valid rows are scored with one ``Detector.score`` call, and the scores are written chunk by chunk,
so memory holds one chunk (plus the drift window) whatever the file's size:

- CSV: ``pandas.read_csv(chunksize=...)``, with the site readers' convention that only an empty cell
  is a missing value (``shared.data.files``): "n/a" in a numeric column is a non-number, not NaN.
- Parquet: ``pyarrow.parquet.ParquetFile.iter_batches``.
- NPZ: ``np.load(mmap_mode=...)`` does not memory-map arrays inside an .npz (a zip archive; it reads
  each array whole), so the ``x`` member is read here as a stream: its .npy header first, then blocks of
  rows. That works for stored (``np.savez``) and compressed (``np.savez_compressed``) archives alike.
  The one exception is a Fortran-ordered ``x``, whose rows are not contiguous in the file: it is read
  whole. Images (``x`` of shape ``[rows, height, width(, channels)]``) come only as NPZ; a table's NPZ
  holds ``x`` ``[rows, features]`` and optionally ``feature_names`` (matched by name, like a header)
  and ``id``.

Schema problems that concern a whole column (a missing or unexpected column, an image of another
shape, an unreadable file) always stop the run. A bad cell (not a number, empty, NaN, infinite) stops it
too with ``on_invalid="fail"``, naming the column and the 1-based data row as the site readers do; with
``on_invalid="skip"`` the row is left out, counted and reported (the first few), and the output, keyed
by the id column (or, without one, by the row number), omits it. A label column present in the input is
ignored.

The output (``id``/``row``, ``score``, ``anomaly``) is written to a temporary file beside ``out`` and
renamed to it only once every row has been read, so a failed run never leaves a partial file posing as
a result (nor replaces an earlier one).

This module needs no ``flwr``; TensorFlow is loaded only by the detector it is given.
"""

from __future__ import annotations

import os
import secrets
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.data.errors import BundleError, DataError
from shared.data.files import cell_problem, column_order, numeric_cells
from shared.input_schema import InputSchema

INPUT_SUFFIXES = (".csv", ".parquet", ".pq", ".npz")
OUTPUT_FORMATS = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
ON_INVALID = ("fail", "skip")
DEFAULT_CHUNK_ROWS = 10_000
# --drift: the monitor's window holds the last DRIFT_WINDOW_CAP scores of the file (all of them when the
# file has fewer): enough for PSI and KS to see a shift of a few percent, bounded in memory (0.8 MB).
DRIFT_WINDOW_CAP = 100_000
REPORTED_PROBLEMS = 10  # skipped rows listed in the summary (all are counted)
ROW_COLUMN = "row"  # the output's key column when the input has no id column
OUTPUT_COLUMNS = ("score", "anomaly")
DEFAULT_LABEL_COLUMN = "label"

ProgressCallback = Callable[[int, int], None]  # (done, total) in the reader's unit (bytes or rows)


@dataclass(frozen=True)
class RowProblem:
    """A bad row: its 1-based data row number, the first bad column in it, and why."""

    row: int
    column: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "column": self.column, "reason": self.reason}

    def error(self, path: str) -> DataError:
        return DataError(self.reason, path=path, row=self.row, column=self.column)

    def __str__(self) -> str:
        return f"row {self.row}, column {self.column!r}: {self.reason}"


@dataclass
class Chunk:
    """Consecutive rows of the input: ``start`` rows precede them."""

    start: int
    x: np.ndarray  # float32, the bundle's layout (columns in its order); bad rows hold anything
    bad: np.ndarray  # bool per row: a cell that is not a finite number
    problems: list[RowProblem]  # the first few bad rows, in row order
    ids: Any | None  # pyarrow Array of the id column's values, or None

    @property
    def rows(self) -> int:
        return len(self.bad)


# -- checks before anything is loaded ----------------------------------------------------------------------
def check_request(
    input_path: str | Path,
    out_path: str | Path | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    on_invalid: str = "fail",
) -> None:
    """The cheap checks, done before the bundle (and TensorFlow) is loaded: DataError for the input,
    ConfigError for the options."""
    from shared.config import ConfigError

    path = Path(input_path)
    if not path.exists():
        raise DataError("file does not exist", path=str(path))
    if not path.is_file():
        raise DataError("not a file", path=str(path))
    if path.suffix.lower() not in INPUT_SUFFIXES:
        raise DataError(
            f"unsupported file type {path.suffix.lower()!r}; use one of {', '.join(INPUT_SUFFIXES)}",
            path=str(path),
        )
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ConfigError(f"--chunk-rows must be a whole number >= 1, got {chunk_rows!r}")
    if on_invalid not in ON_INVALID:
        raise ConfigError(f"--on-invalid must be one of {', '.join(ON_INVALID)}, got {on_invalid!r}")
    if out_path is None:
        return
    out = Path(out_path)
    if out.suffix.lower() not in OUTPUT_FORMATS:
        raise ConfigError(f"--out {out}: the name must end in .csv, .parquet or .pq (it sets the format)")
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory")
    if out.exists() and out.resolve() == path.resolve():
        raise ConfigError(f"--out {out} is the input file")


def default_label_column(detector: Any) -> str:
    """The training run's label column (its run config's ``label-column``), else ``label``."""
    run_config = (detector.metadata.get("training_run") or {}).get("run_config") or {}
    return str(run_config.get("label-column") or DEFAULT_LABEL_COLUMN)


# -- the scoring loop ----------------------------------------------------------------------------------------
def score_file(
    detector: Any,
    input_path: str | Path,
    out_path: str | Path | None = None,
    *,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    on_invalid: str = "fail",
    label_column: str | None = None,
    id_column: str | None = None,
    drift: bool = False,
    on_progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Score every row of ``input_path`` with ``detector``, chunk by chunk; write ``out_path`` (CSV or
    Parquet by its suffix: the id column, or ``row``, then ``score`` and ``anomaly``) if given.

    Returns the summary (rows scored and skipped, anomalies, threshold, drift status with ``drift``).
    Raises DataError for bad input (``on_invalid="fail"``: the first bad row), or when no row could be
    scored; no output file is left behind then.
    """
    check_request(input_path, out_path, chunk_rows, on_invalid)
    path = Path(input_path)
    monitor = None
    if drift:
        from shared.drift import DriftMonitor

        if detector.drift_reference is None:
            raise DataError(
                "the bundle has no drift reference (drift.json; bundles exported before it existed, or made "
                "by hand, lack it): export the run's bundle again with this fedae, or drop --drift"
            )
        monitor = DriftMonitor(detector.drift_reference, window=DRIFT_WINDOW_CAP)
    label = label_column or default_label_column(detector)
    try:
        schema = InputSchema.from_detector(detector)
    except ValueError as err:  # feature names that do not fit the model: a broken bundle
        raise BundleError(f"the bundle's input schema: {err}") from err
    reader = open_input(path, schema, chunk_rows, label, id_column)
    if reader.id_column in OUTPUT_COLUMNS:
        reader.close()
        raise DataError(
            f"the id column is named like an output column ({', '.join(OUTPUT_COLUMNS)}): rename it",
            path=str(path),
            column=reader.id_column,
        )
    writer: _OutputFile | None = None
    rows_read = scored = skipped = anomalies = 0
    problems: list[RowProblem] = []
    try:
        if out_path is not None:
            writer = _OutputFile(Path(out_path), reader.id_column or ROW_COLUMN)
        for chunk in reader.chunks():
            rows_read += chunk.rows
            if chunk.problems:
                if on_invalid == "fail":
                    raise chunk.problems[0].error(str(path))
                skipped += int(chunk.bad.sum())
                problems += chunk.problems[: REPORTED_PROBLEMS - len(problems)]
            keep = ~chunk.bad
            if keep.any():
                scores = np.asarray(detector.score(chunk.x[keep]), dtype=np.float64)
                flags = (scores > detector.threshold).astype(np.int8)  # Detector.predict's rule
                scored += len(scores)
                anomalies += int(flags.sum())
                if monitor is not None:
                    monitor.observe(scores[np.isfinite(scores)])
                if writer is not None:
                    writer.write(_keys(chunk, keep), scores, flags)
            if on_progress is not None:
                on_progress(*reader.progress())
        if rows_read == 0:
            raise DataError("file has no rows", path=str(path))
        if scored == 0:
            raise DataError(
                f"no row could be scored: all {rows_read} rows are invalid (first: {problems[0]})",
                path=str(path),
            )
        if writer is not None:
            writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    finally:
        reader.close()
    return {
        "bundle_id": detector.bundle_id or None,
        "input": str(path),
        "output": None if writer is None else str(writer.path),
        "output_format": None if writer is None else writer.format,
        "id_column": reader.id_column,
        "ignored_columns": list(reader.ignored),
        "on_invalid": on_invalid,
        "rows_read": rows_read,
        "rows_scored": scored,
        "rows_skipped": skipped,
        "skipped": [p.to_dict() for p in problems],
        "anomalies": anomalies,
        "anomaly_rate": anomalies / scored,
        "threshold": float(detector.threshold),
        "threshold_rule": detector.threshold_rule,
        "threshold_rule_description": detector.metadata.get("threshold_rule"),
        "anomaly_if": "score > threshold",
        "drift": None if monitor is None else _drift_section(monitor),
    }


def _keys(chunk: Chunk, keep: np.ndarray) -> Any:
    import pyarrow as pa

    if chunk.ids is not None:
        return chunk.ids.filter(pa.array(keep))
    return pa.array(np.arange(chunk.start + 1, chunk.start + chunk.rows + 1, dtype=np.int64)[keep])


def _drift_section(monitor: Any) -> dict[str, Any]:
    status = monitor.status()
    return {
        **status.to_dict(),
        "scores_observed": monitor.observed_total,
        "window_cap": monitor.window,
        "window_is": (
            "every scored row"
            if monitor.observed_total <= monitor.window
            else f"the last {monitor.window} scored rows of the file"
        ),
        "reference_size": monitor.reference.reference_size,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as ``fedae detect`` prints it without --json."""
    rate = summary["anomaly_rate"]
    rule = summary.get("threshold_rule_description") or summary["threshold_rule"]
    lines = [
        f"Scored {summary['rows_scored']} of {summary['rows_read']} rows of {summary['input']}"
        + (f" (bundle {summary['bundle_id']})" if summary.get("bundle_id") else ""),
        f"  anomalies: {summary['anomalies']} ({100 * rate:.2f} %), score > {summary['threshold']:.6g} "
        f"({rule})",
    ]
    if summary["rows_skipped"]:
        lines.append(f"  skipped {summary['rows_skipped']} invalid row(s), not in the output; first:")
        lines += [f"    row {p['row']}, column {p['column']!r}: {p['reason']}" for p in summary["skipped"]]
    if summary["ignored_columns"]:
        lines.append(f"  ignored (not features): {', '.join(summary['ignored_columns'])}")
    drift = summary.get("drift")
    if drift is not None:
        verdict = "ALERT" if drift["alert"] else "ok"
        lines.append(f"  drift: {verdict}: {drift['reason']} (window: {drift['window_is']})")
    if summary["output"]:
        key = summary["id_column"] or ROW_COLUMN
        lines.append(f"  written: {summary['output']} ({key}, score, anomaly)")
    return "\n".join(lines)


# -- readers ------------------------------------------------------------------------------------------------
class _Reader:
    """One input file, read chunk by chunk in the bundle's layout."""

    path: Path
    id_column: str | None = None
    ignored: tuple[str, ...] = ()

    def chunks(self) -> Iterator[Chunk]:
        raise NotImplementedError

    def progress(self) -> tuple[int, int]:
        """(done, total): bytes for CSV, rows otherwise."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file (the chunks need not have been read to the end)."""


def open_input(
    path: str | Path,
    schema: InputSchema,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    label_column: str = DEFAULT_LABEL_COLUMN,
    id_column: str | None = None,
) -> _Reader:
    """A chunked reader of ``path`` for ``schema``; column-level problems are raised here, before any
    row is read (missing or unexpected columns, an image of another shape, an unreadable file)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _NpzReader(path, schema, chunk_rows, label_column, id_column)
    if schema.is_image:
        raise DataError(
            f"the bundle scores images {schema.shape}: give an NPZ file with an array 'x' "
            "[rows, height, width(, channels)]",
            path=str(path),
        )
    if suffix == ".csv":
        return _CsvReader(path, schema, chunk_rows, label_column, id_column)
    return _ParquetReader(path, schema, chunk_rows, label_column, id_column)


def _pick_id(
    columns: list[str], requested: str | None, features: tuple[str, ...], path: Path, what: str = "column"
) -> str | None:
    """The id column: ``requested`` (which must exist), else the one named id in any case, if any."""
    if requested is not None:
        if requested not in columns:
            raise DataError(f"no id {what} {requested!r} (--id-column)", path=str(path), column=requested)
        return requested
    found = [c for c in columns if c.lower() == "id" and c not in features]
    if len(found) > 1:
        raise DataError(
            f"several id {what}s {found}: choose one with --id-column", path=str(path), column=found[0]
        )
    return found[0] if found else None


@dataclass(frozen=True)
class _TableLayout:
    features: list[str]  # the file's feature columns, in the file's order
    order: list[int]  # indices into ``features`` giving the bundle's order
    id_column: str | None
    ignored: tuple[str, ...]


def _table_layout(
    columns: list[str], schema: InputSchema, path: Path, label_column: str, id_column: str | None
) -> _TableLayout:
    duplicated = sorted({c for c in columns if columns.count(c) > 1})
    if duplicated:
        raise DataError(f"duplicate column name(s) {duplicated}", path=str(path), column=duplicated[0])
    id_name = _pick_id(columns, id_column, schema.feature_names, path)
    ignored = tuple(
        c for c in columns if c == label_column and c != id_name and c not in schema.feature_names
    )
    features = [c for c in columns if c != id_name and c not in ignored]
    if schema.feature_names:
        order = column_order(tuple(features), schema.feature_names, str(path))
    elif len(features) != schema.shape[0]:
        raise DataError(
            f"{len(features)} feature column(s), the bundle expects {schema.shape[0]} (its schema names "
            "none, so they are taken in file order)",
            path=str(path),
        )
    else:
        order = list(range(len(features)))
    return _TableLayout(features, order, id_name, ignored)


def _frame_chunk(frame: Any, layout: _TableLayout, start: int, ids: Any | None) -> Chunk:
    """Check every feature cell of a pandas frame (``shared.data.files``' rules) and build the chunk."""
    rows, width = len(frame), len(layout.features)
    x = np.empty((rows, width), dtype=np.float32)
    bad_cells = np.empty((rows, width), dtype=bool)
    with np.errstate(over="ignore"):  # a finite float64 beyond float32's range becomes inf: bad
        for j, column in enumerate(layout.features):
            values, _ = numeric_cells(frame[column])
            x[:, j] = values
            bad_cells[:, j] = ~np.isfinite(x[:, j])
    bad = bad_cells.any(axis=1)
    problems = []
    for r in np.flatnonzero(bad)[:REPORTED_PROBLEMS]:
        j = int(np.argmax(bad_cells[r]))
        column = layout.features[j]
        raw = frame[column].iloc[r]
        problems.append(RowProblem(start + int(r) + 1, column, cell_problem(raw, float(x[r, j]))))
    return Chunk(start, x[:, layout.order], bad, problems, ids)


class _CsvReader(_Reader):
    def __init__(
        self, path: Path, schema: InputSchema, chunk_rows: int, label_column: str, id_column: str | None
    ) -> None:
        import pandas as pd

        self.path, self.chunk_rows = path, chunk_rows
        try:
            header = pd.read_csv(path, nrows=0, keep_default_na=False, na_values=[""])
        except Exception as err:  # pandas raises many types for unreadable files; all mean "bad file"
            raise DataError(f"cannot be read as CSV: {err}", path=str(path)) from err
        self.layout = _table_layout([str(c) for c in header.columns], schema, path, label_column, id_column)
        self.id_column, self.ignored = self.layout.id_column, self.layout.ignored
        self.size = path.stat().st_size
        self._handle: Any = None

    def chunks(self) -> Iterator[Chunk]:
        import pandas as pd
        import pyarrow as pa

        # Ids are kept as the text they are ("007" stays "007"); everything else as pandas reads it.
        dtype = {self.id_column: str} if self.id_column else None
        self._handle = self.path.open("rb")
        try:
            reader = pd.read_csv(
                self._handle,
                chunksize=self.chunk_rows,
                keep_default_na=False,
                na_values=[""],
                dtype=dtype,  # type: ignore[arg-type]
            )
        except Exception as err:
            raise DataError(f"cannot be read as CSV: {err}", path=str(self.path)) from err
        start = 0
        with reader:
            while True:
                try:
                    frame = next(reader)
                except StopIteration:
                    return
                except Exception as err:  # a malformed line (too many fields, bad quoting)
                    raise DataError(f"cannot be read as CSV: {err}", path=str(self.path)) from err
                frame.columns = [str(c) for c in frame.columns]
                ids = None
                if self.id_column:
                    ids = pa.array(frame[self.id_column], type=pa.string(), from_pandas=True)
                yield _frame_chunk(frame, self.layout, start, ids)
                start += len(frame)

    def progress(self) -> tuple[int, int]:
        done = self.size
        if self._handle is not None and not self._handle.closed:
            done = min(self._handle.tell(), self.size)  # the parser reads ahead: about right
        return done, self.size

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()


class _ParquetReader(_Reader):
    def __init__(
        self, path: Path, schema: InputSchema, chunk_rows: int, label_column: str, id_column: str | None
    ) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path, self.chunk_rows = path, chunk_rows
        try:
            self._file = pq.ParquetFile(path)
            arrow_schema = self._file.schema_arrow
        except Exception as err:  # pyarrow's ArrowInvalid, OSError...: all mean "bad file"
            raise DataError(f"cannot be read as Parquet: {err}", path=str(path)) from err
        self.layout = _table_layout(list(arrow_schema.names), schema, path, label_column, id_column)
        self.id_column, self.ignored = self.layout.id_column, self.layout.ignored
        for name in self.layout.features:
            kind = arrow_schema.field(name).type
            if pa.types.is_nested(kind):
                raise DataError(f"holds {kind} values, not numbers", path=str(path), column=name)
        self.total = self._file.metadata.num_rows
        self._done = 0

    def chunks(self) -> Iterator[Chunk]:
        columns = self.layout.features + ([self.id_column] if self.id_column else [])
        batches = self._file.iter_batches(batch_size=self.chunk_rows, columns=columns)
        start = 0
        while True:
            try:
                batch = next(batches)
                frame = batch.select(self.layout.features).to_pandas()
            except StopIteration:
                return
            except Exception as err:  # a damaged row group
                raise DataError(f"cannot be read as Parquet: {err}", path=str(self.path)) from err
            ids = batch.column(self.id_column) if self.id_column else None
            yield _frame_chunk(frame, self.layout, start, ids)
            start += batch.num_rows
            self._done = start

    def progress(self) -> tuple[int, int]:
        return self._done, self.total

    def close(self) -> None:
        self._file.close()


class _NpyMember:
    """One array of an .npz archive, read as a stream of row blocks (see the module's docstring)."""

    def __init__(self, archive: zipfile.ZipFile, member: str, key: str, path: Path) -> None:
        self.key, self.path = key, path
        self._stream = archive.open(member)
        try:
            version = np.lib.format.read_magic(self._stream)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(self._stream)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(self._stream)
            else:
                raise ValueError(f".npy format version {version} is not supported")
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            raise DataError(f"array {key!r} cannot be read: {err}", path=str(path), column=key) from err
        if dtype.hasobject:
            raise DataError(
                f"array {key!r} holds Python objects (read only with pickle, which fedae never does)",
                path=str(path),
                column=key,
            )
        if len(shape) == 0:
            raise DataError(f"array {key!r} is a single value, not rows", path=str(path), column=key)
        self.shape, self.dtype = tuple(int(s) for s in shape), dtype
        self._row_bytes = dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
        self._whole: np.ndarray | None = None
        self._next = 0
        if fortran and len(self.shape) > 1:
            # A Fortran-ordered array's rows are interleaved in the file: the one case read whole.
            self._whole = np.frombuffer(self._read_bytes(dtype.itemsize * int(np.prod(self.shape))), dtype)
            self._whole = self._whole.reshape(self.shape, order="F")

    def _read_bytes(self, count: int) -> bytes:
        parts, left = [], count
        try:
            while left > 0:
                block = self._stream.read(min(left, 1 << 26))
                if not block:
                    break
                parts.append(block)
                left -= len(block)
        except (OSError, zipfile.BadZipFile, EOFError) as err:  # includes a failed CRC or decompression
            raise DataError(f"array {self.key!r} cannot be read: {err}", path=str(self.path)) from err
        if left:
            raise DataError(f"array {self.key!r} is truncated (damaged archive)", path=str(self.path))
        return b"".join(parts)

    def read(self, rows: int) -> np.ndarray:
        """The next ``rows`` rows (read-only)."""
        start, self._next = self._next, self._next + rows
        if self._whole is not None:
            return self._whole[start : start + rows]
        data = np.frombuffer(self._read_bytes(rows * self._row_bytes), dtype=self.dtype)
        return data.reshape(rows, *self.shape[1:])

    def read_all(self) -> np.ndarray:
        return self.read(self.shape[0] - self._next)

    def close(self) -> None:
        self._stream.close()


class _NpzReader(_Reader):
    def __init__(
        self, path: Path, schema: InputSchema, chunk_rows: int, label_column: str, id_column: str | None
    ) -> None:
        self.path, self.chunk_rows, self.schema = path, chunk_rows, schema
        self._members: list[_NpyMember] = []
        try:
            self._archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise DataError(f"cannot be read as NPZ: {err}", path=str(path)) from err
        try:
            self._open(label_column, id_column)
        except BaseException:
            self.close()
            raise

    def _member(self, key: str) -> _NpyMember:
        member = _NpyMember(self._archive, self._keys[key], key, self.path)
        self._members.append(member)
        return member

    def _open(self, label_column: str, id_column: str | None) -> None:
        path, schema = self.path, self.schema
        self._keys = {n[: -len(".npy")]: n for n in self._archive.namelist() if n.endswith(".npy")}
        if "x" not in self._keys:
            raise DataError(f"NPZ needs an array named 'x' (found {sorted(self._keys)})", path=str(path))
        self.x = self._member("x")
        if not np.issubdtype(self.x.dtype, np.number) or np.issubdtype(self.x.dtype, np.complexfloating):
            raise DataError(f"array 'x' has non-numeric dtype {self.x.dtype}", path=str(path), column="x")
        self.total, row_shape = self.x.shape[0], self.x.shape[1:]
        self._add_channel = False
        self.names: tuple[str, ...] = ()
        self.order: list[int] | None = None
        used = {"x"}
        if schema.is_image:
            if row_shape != schema.shape:
                if (*row_shape, 1) != schema.shape:
                    raise DataError(
                        f"images of shape {row_shape}, the bundle expects {schema.shape}",
                        path=str(path),
                        column="x",
                    )
                self._add_channel = True  # grey-scale images without a channel axis
        else:
            if len(row_shape) != 1:
                raise DataError(
                    f"array 'x' holds rows of shape {row_shape}; the bundle scores table rows of "
                    f"{schema.shape[0]} features",
                    path=str(path),
                    column="x",
                )
            self.names, self.order = self._feature_names(row_shape[0], schema)
            used.add("feature_names")
        self.id_column = _pick_id(list(self._keys), id_column, (), path, what="array")
        self.ids: _NpyMember | None = None
        if self.id_column:
            self.ids = self._member(self.id_column)
            if self.ids.shape != (self.total,) or self.ids.dtype.kind not in "iufUSb":
                raise DataError(
                    f"id array must hold one number or string per row of 'x' ({self.total},), got shape "
                    f"{self.ids.shape} of {self.ids.dtype}",
                    path=str(path),
                    column=self.id_column,
                )
            used.add(self.id_column)
        self.ignored = tuple(k for k in self._keys if k not in used)  # labels ('label', 'y') and the rest
        self._done = 0

    def _feature_names(self, width: int, schema: InputSchema) -> tuple[tuple[str, ...], list[int]]:
        if "feature_names" not in self._keys:
            if width != schema.shape[0]:
                raise DataError(
                    f"array 'x' has {width} features, the bundle expects {schema.shape[0]}",
                    path=str(self.path),
                    column="x",
                )
            names = schema.feature_names or tuple(f"f{i}" for i in range(width))
            return names, list(range(width))
        member = self._member("feature_names")
        raw = member.read_all()
        if raw.ndim != 1 or len(raw) != width or raw.dtype.kind not in "US":
            raise DataError(
                f"'feature_names' must be {width} strings (one per column of 'x'), got shape {raw.shape} "
                f"of {raw.dtype}",
                path=str(self.path),
                column="feature_names",
            )
        names = tuple(str(n) for n in raw.astype(str))
        if not schema.feature_names:
            if width != schema.shape[0]:
                raise DataError(
                    f"array 'x' has {width} features, the bundle expects {schema.shape[0]}",
                    path=str(self.path),
                    column="x",
                )
            return names, list(range(width))
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise DataError(
                f"duplicate feature name(s) {duplicated}", path=str(self.path), column=duplicated[0]
            )
        return names, column_order(names, schema.feature_names, str(self.path))

    def chunks(self) -> Iterator[Chunk]:
        import pyarrow as pa

        for start in range(0, self.total, self.chunk_rows):
            rows = min(self.chunk_rows, self.total - start)
            raw = self.x.read(rows)
            with np.errstate(over="ignore"):  # a float64 beyond float32's range becomes inf: bad
                x = raw.astype(np.float32)
            bad_cells = ~np.isfinite(x.reshape(rows, -1))
            bad = bad_cells.any(axis=1)
            problems = []
            for r in np.flatnonzero(bad)[:REPORTED_PROBLEMS]:
                if self.order is None:  # images: the whole row is one 'x'
                    problems.append(RowProblem(start + int(r) + 1, "x", "contains NaN or infinite values"))
                    continue
                j = int(np.argmax(bad_cells[r]))
                value = raw[r, j].item()
                reason = "value is NaN" if np.isnan(value) else f"value {value!r} is infinite"
                problems.append(RowProblem(start + int(r) + 1, self.names[j], reason))
            if self._add_channel:
                x = x[..., None]
            if self.order is not None:
                x = x[:, self.order]
            ids = None
            if self.ids is not None:
                values = self.ids.read(rows)
                ids = pa.array(_decoded(values, self.path, start) if values.dtype.kind == "S" else values)
            self._done = start + rows
            yield Chunk(start, x, bad, problems, ids)

    def progress(self) -> tuple[int, int]:
        return self._done, self.total

    def close(self) -> None:
        for member in self._members:
            member.close()
        self._archive.close()


# -- output -------------------------------------------------------------------------------------------------
class _OutputFile:
    """The scores, written chunk by chunk to a hidden temporary file beside ``path``, renamed to ``path``
    by ``commit`` (atomic on one file system); ``abort`` removes it."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = path, key
        self.format = OUTPUT_FORMATS[path.suffix.lower()]
        self._tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.partial"
        self._csv: Any = None
        self._parquet: Any = None
        if self.format == "csv":
            self._csv = self._tmp.open("x", newline="", encoding="utf-8")  # "x": never someone else's file
            self._csv.write(f"{_csv_header(key)},score,anomaly\n")
        else:
            self._tmp.touch(exist_ok=False)

    def write(self, keys: Any, scores: np.ndarray, flags: np.ndarray) -> None:
        import pyarrow as pa

        table = pa.table(
            {self.key: keys, "score": pa.array(scores, pa.float64()), "anomaly": pa.array(flags, pa.int8())}
        )
        if self._csv is not None:
            import pandas as pd

            frame = table.to_pandas(types_mapper=pd.ArrowDtype)  # integer ids with nulls stay integers
            frame.to_csv(self._csv, header=False, index=False)
            return
        import pyarrow.parquet as pq

        if self._parquet is None:
            self._schema = table.schema  # the first chunk's types (the id's is the input's throughout)
            self._parquet = pq.ParquetWriter(self._tmp, self._schema)
        self._parquet.write_table(table.cast(self._schema))

    def _close(self) -> None:
        if self._csv is not None:
            self._csv.close()
        if self._parquet is not None:
            self._parquet.close()

    def commit(self) -> None:
        if self.format == "parquet" and self._parquet is None:
            raise RuntimeError("no rows were written")  # score_file refuses a file with no scored row first
        self._close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._close()
        finally:
            self._tmp.unlink(missing_ok=True)


def _csv_header(name: str) -> str:
    """One CSV header cell, quoted when it needs to be."""
    import csv
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow([name])
    return buffer.getvalue()


def _decoded(values: np.ndarray, path: Any, start: int) -> np.ndarray:
    """Byte-string ids as text; one that is not UTF-8 is a DataError naming its row, not a crash."""
    try:
        return np.char.decode(values, "utf-8")
    except UnicodeDecodeError:
        for r, value in enumerate(values):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    f"id {value!r} is not UTF-8 text ({err.reason})", path=str(path), row=start + r + 1
                ) from err
        raise
