"""Readers for site files (CSV, Parquet, NPZ) with schema checks that name the file, row and column."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.data.errors import DataError

SUPPORTED_SUFFIXES = (".csv", ".parquet", ".pq", ".npz")


@dataclass(frozen=True)
class Table:
    """Numeric features of one file, with optional 0/1 labels and the features' names or image shape."""

    path: str
    x: np.ndarray  # float32, [rows, features] or [rows, h, w, c]
    labels: np.ndarray | None
    feature_names: tuple[str, ...]

    @property
    def is_image(self) -> bool:
        return self.x.ndim == 4


def list_site_files(data_dir: str) -> list[Path]:
    """Site files of ``data_dir`` sorted by name: file k is client k."""
    folder = Path(data_dir)
    if not folder.exists():
        raise DataError("data directory does not exist", path=str(folder))
    if not folder.is_dir():
        raise DataError("expected a directory holding one data file per site", path=str(folder))
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"no site files ({', '.join(SUPPORTED_SUFFIXES)}) found", path=str(folder))
    return files


def read_table(path: str | Path, label_column: str = "label", require_labels: bool = False) -> Table:
    """Read one CSV, Parquet or NPZ file and check that every value is a finite number."""
    path = Path(path)
    if not path.exists():
        raise DataError("file does not exist", path=str(path))
    suffix = path.suffix.lower()
    if suffix == ".npz":
        table = _read_npz(path, label_column)
    elif suffix in (".csv", ".parquet", ".pq"):
        table = _read_frame(path, label_column)
    else:
        raise DataError(
            f"unsupported file type {suffix!r}; use one of {', '.join(SUPPORTED_SUFFIXES)}", path=str(path)
        )
    if require_labels and table.labels is None:
        raise DataError(f"no label column {label_column!r} (1 = anomaly, 0 = normal)", path=str(path))
    if len(table.x) == 0:
        raise DataError("file has no rows", path=str(path))
    return table


def _read_frame(path: Path, label_column: str) -> Table:
    import pandas as pd

    try:
        # Only empty cells are missing values: "n/a" or "NULL" in a numeric column is reported as the
        # non-number it is rather than silently read as NaN.
        if path.suffix.lower() == ".csv":
            frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
        else:
            frame = pd.read_parquet(path)
    except Exception as err:  # pandas raises many types for unreadable files; all mean "bad file"
        raise DataError(
            f"cannot be read as {path.suffix.lstrip('.').upper()}: {err}", path=str(path)
        ) from err
    labels = None
    if label_column in frame.columns:
        labels = _labels(frame[label_column].to_numpy(), path, label_column)
        frame = frame.drop(columns=[label_column])
    # An "id" column is carried by users for joining results, never a feature.
    frame = frame.drop(columns=[c for c in frame.columns if str(c).lower() == "id"])
    if frame.shape[1] == 0:
        raise DataError("no feature columns", path=str(path))
    x = np.empty(frame.shape, dtype=np.float32)
    for j, column in enumerate(frame.columns):
        values, bad = numeric_cells(frame[column])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            reason = cell_problem(frame[column].iloc[row], values[row])
            raise DataError(reason, path=str(path), row=row + 1, column=str(column))
        x[:, j] = values
    return Table(str(path), x, labels, tuple(str(c) for c in frame.columns))


def numeric_cells(column: Any) -> tuple[np.ndarray, np.ndarray]:
    """A table column (pandas Series) as float64 values, and the mask of its cells that are not finite
    numbers (missing, not a number, or infinite): ``cell_problem`` says which."""
    import pandas as pd

    kind = getattr(column.dtype, "kind", "O")
    if kind in "bMm":
        # Booleans, dates and durations convert to numbers (0/1, epoch nanoseconds), but no sensor
        # reading is one: a column of them is a wrong column, refused like text.
        values = np.full(len(column), np.nan)
    else:
        if kind == "O":  # a True among numbers in a mixed column: the same refusal
            column = column.map(lambda v: np.nan if isinstance(v, bool | np.bool_) else v)
        values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    return values, ~np.isfinite(values)


def cell_problem(raw: object, value: float) -> str:
    """Why a cell is not a finite number, from its raw content and ``numeric_cells``' value for it."""
    import pandas as pd

    raw = _plain(raw)
    if pd.isna(raw):
        return "value is missing (empty or NaN)"
    if pd.isna(value):
        return f"value {raw!r} is not a number"
    return f"value {raw!r} is infinite"


def _read_npz(path: Path, label_column: str) -> Table:
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:  # corrupt archives raise zipfile/OSError/ValueError variants
        raise DataError(f"cannot be read as NPZ: {err}", path=str(path)) from err
    with archive:
        if "x" not in archive.files:
            raise DataError(f"NPZ needs an array named 'x' (found {archive.files})", path=str(path))
        x = archive["x"]
        labels = None
        for key in (label_column, "y"):
            if key in archive.files:
                labels = _labels(archive[key], path, key)
                break
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"array 'x' has non-numeric dtype {x.dtype}", path=str(path), column="x")
    if x.ndim == 3:  # grey-scale images without a channel axis
        x = x[..., None]
    if x.ndim not in (2, 4):
        raise DataError(
            f"array 'x' must be [rows, features] or [rows, height, width(, channels)], got shape {x.shape}",
            path=str(path),
            column="x",
        )
    flat = x.reshape(len(x), -1)
    bad_rows = np.flatnonzero(~np.isfinite(flat).all(axis=1))
    if bad_rows.size:
        raise DataError(
            "contains NaN or infinite values", path=str(path), row=int(bad_rows[0]) + 1, column="x"
        )
    if labels is not None and len(labels) != len(x):
        raise DataError(f"{len(labels)} labels for {len(x)} rows", path=str(path), column=label_column)
    names = tuple(f"f{i}" for i in range(x.shape[1])) if x.ndim == 2 else ()
    return Table(str(path), x.astype(np.float32), labels, names)


def _labels(values: np.ndarray, path: Path, column: str) -> np.ndarray:
    import pandas as pd

    numeric = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy()
    bad = ~np.isin(numeric, (0, 1))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"label {_plain(values[row])!r} is not 0 (normal) or 1 (anomaly)",
            path=str(path),
            row=row + 1,
            column=column,
        )
    return numeric.astype(np.int64)


def _plain(value: object) -> object:
    """numpy scalars as Python values, so messages read `7`, not `np.int64(7)`."""
    return value.item() if isinstance(value, np.generic) else value


def check_consistent(tables: list[Table]) -> None:
    """All sites must share one schema: same feature names (order may differ for tables) or image shape."""
    first = tables[0]
    for table in tables[1:]:
        if first.is_image != table.is_image or (first.is_image and first.x.shape[1:] != table.x.shape[1:]):
            raise DataError(
                f"shape {table.x.shape[1:]} differs from {first.path}'s {first.x.shape[1:]}", path=table.path
            )
        if not first.is_image and set(first.feature_names) != set(table.feature_names):
            missing = sorted(set(first.feature_names) - set(table.feature_names))
            extra = sorted(set(table.feature_names) - set(first.feature_names))
            raise DataError(
                f"columns differ from {Path(first.path).name}: missing {missing}, extra {extra}",
                path=table.path,
            )


def align_columns(table: Table, names: tuple[str, ...]) -> np.ndarray:
    """Return the table's features in the order ``names`` (matched by name, so column order may differ)."""
    if table.is_image or table.feature_names == names:
        return table.x
    return table.x[:, column_order(table.feature_names, names, table.path)]


def column_order(found: tuple[str, ...], names: tuple[str, ...], path: str) -> list[int]:
    """Indices into ``found`` that give the columns ``names`` (matched by name); a DataError naming the
    first missing column, else the first unexpected one."""
    missing = [n for n in names if n not in found]
    if missing:
        raise DataError(f"missing column(s) {missing}", path=path, column=missing[0])
    extra = [n for n in found if n not in names]
    if extra:
        raise DataError(f"unexpected column(s) {extra}", path=path, column=extra[0])
    return [found.index(n) for n in names]
