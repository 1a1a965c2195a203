"""`fedae detect`: batch scoring of CSV, Parquet and NPZ files in chunks, as a user runs it.

Real files on disk, real bundles (tiny untrained models: the scores only have to match the detector's),
the command through ``fedae.cli.main`` (one real process for the exit code)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedae.cli import main
from shared.detector import Detector, load_bundle, save_bundle
from shared.drift import DriftReference
from shared.models import ModelSpec, build_model
from shared.preprocess import Scaler
from shared.scoring import ResidualScorer

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ("a", "b", "c", "d")
IMAGE_SHAPE = (6, 6, 1)
ROWS = 100  # not a multiple of the chunk sizes below


def _export(folder: Path, x_calibration: np.ndarray, kind: str, drift: bool) -> Detector:
    """A bundle whose threshold is the calibration scores' 90th percentile and whose drift reference is
    built from the same scores (known data)."""
    image = kind == "image"
    scaler = Scaler.fit(x_calibration, kind, (0.0, 16.0) if image else None, flatten=True)
    spec = ModelSpec("dense", scaler.model_input_shape, 3, "sigmoid" if image else "linear")
    schema = {
        "kind": kind,
        "shape": list(x_calibration.shape[1:]),
        "feature_names": [] if image else list(FEATURES),
    }
    metadata = {"input_schema": schema, "training_run": {"run_config": {"label-column": "label"}}}
    detector = Detector(
        build_model(spec), spec, scaler, ResidualScorer("mse", None), 0.0, "percentile", metadata
    )
    scores = detector.score(x_calibration)
    detector.threshold = float(np.percentile(scores, 90))
    if drift:
        detector.drift_reference = DriftReference.from_scores(scores)
    save_bundle(detector, folder)
    return load_bundle(folder)  # what the command will load, bundle_id included


@pytest.fixture(scope="module")
def table_bundle(tmp_path_factory) -> tuple[Path, Detector]:
    folder = tmp_path_factory.mktemp("table") / "bundle"
    x = np.random.default_rng(7).normal(size=(2000, len(FEATURES))).astype(np.float32)
    return folder, _export(folder, x, "tabular", drift=True)


@pytest.fixture(scope="module")
def image_bundle(tmp_path_factory) -> tuple[Path, Detector]:
    folder = tmp_path_factory.mktemp("image") / "bundle"
    x = np.random.default_rng(8).integers(0, 17, size=(200, *IMAGE_SHAPE)).astype(np.float32)
    return folder, _export(folder, x, "image", drift=False)


def _rows(rng: np.random.Generator, rows: int = ROWS, shift: float = 0.0) -> np.ndarray:
    # Four decimals: the CSV's text reads back as exactly these float32 values.
    return np.round(rng.normal(size=(rows, len(FEATURES))) * (1 + shift) + shift, 4).astype(np.float32)


def _frame(x: np.ndarray, order=("d", "b", "ID", "a", "label", "c")) -> pd.DataFrame:
    """The table with an id column ("r000", ...), a label column, and the columns shuffled."""
    frame = pd.DataFrame(x.astype(np.float64), columns=list(FEATURES))
    frame["ID"] = [f"r{i:03d}" for i in range(len(x))]
    frame["label"] = np.arange(len(x)) % 2
    return frame[list(order)]


def _write(frame: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path, index=False)
    return path


def _detect(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["detect", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _read(path: Path) -> pd.DataFrame:
    if path.suffix == ".csv":
        return pd.read_csv(path, keep_default_na=False, na_values=[""], dtype={"ID": str})
    return pd.read_parquet(path)


def _assert_scores(out: pd.DataFrame, detector: Detector, x: np.ndarray) -> None:
    expected = detector.score(x)
    np.testing.assert_allclose(out["score"].to_numpy(), expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(out["anomaly"].to_numpy(), (expected > detector.threshold).astype(int))


# -- scoring -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("source", "target"), [("csv", "csv"), ("parquet", "parquet"), ("csv", "pq")])
def test_tables_score_like_the_detector_with_ids_carried_and_columns_matched_by_name(
    tmp_path, rng, capsys, table_bundle, source: str, target: str
) -> None:
    folder, detector = table_bundle
    x = _rows(rng)
    data = _write(_frame(x), tmp_path / f"in.{source}")
    out = tmp_path / f"scores.{target}"

    code, stdout, stderr = _detect(capsys, folder, data, "--out", out, "--chunk-rows", "7")

    assert code == 0, stderr
    scores = _read(out)
    assert list(scores.columns) == ["ID", "score", "anomaly"]
    assert scores["ID"].tolist() == [f"r{i:03d}" for i in range(ROWS)]
    _assert_scores(scores, detector, x)
    assert f"Scored {ROWS} of {ROWS} rows" in stdout and "ignored (not features): label" in stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


@pytest.mark.parametrize("layout", ["names-shuffled", "positional", "compressed", "fortran"])
def test_table_npz_scores_like_the_detector(tmp_path, rng, capsys, table_bundle, layout: str) -> None:
    folder, detector = table_bundle
    x = _rows(rng)
    ids = np.arange(1000, 1000 + ROWS)
    if layout == "names-shuffled":
        np.savez(
            tmp_path / "in.npz", x=x[:, [2, 0, 3, 1]], feature_names=np.array(["c", "a", "d", "b"]), id=ids
        )
    elif layout == "compressed":
        np.savez_compressed(tmp_path / "in.npz", x=x, id=ids, label=np.zeros(ROWS, int))
    elif layout == "fortran":  # rows are not contiguous in the file: read whole, same scores
        np.savez(tmp_path / "in.npz", x=np.asfortranarray(x), id=ids)
    else:
        np.savez(tmp_path / "in.npz", x=x, id=ids)

    code, _, stderr = _detect(
        capsys, folder, tmp_path / "in.npz", "--out", tmp_path / "o.csv", "--chunk-rows", "7"
    )

    assert code == 0, stderr
    scores = pd.read_csv(tmp_path / "o.csv")
    assert scores["id"].tolist() == ids.tolist()
    _assert_scores(scores, detector, x)


@pytest.mark.parametrize("grey", [True, False])
def test_image_npz_scores_like_the_detector(tmp_path, rng, capsys, image_bundle, grey: bool) -> None:
    folder, detector = image_bundle
    x = rng.integers(0, 17, size=(ROWS, *IMAGE_SHAPE)).astype(np.float32)
    stored = x[..., 0] if grey else x  # grey-scale images may come without the channel axis
    np.savez(tmp_path / "img.npz", x=stored, id=np.array([f"img{i}" for i in range(ROWS)]), y=np.zeros(ROWS))

    code, _, stderr = _detect(
        capsys, folder, tmp_path / "img.npz", "--out", tmp_path / "o.parquet", "--chunk-rows", "9"
    )

    assert code == 0, stderr
    scores = pd.read_parquet(tmp_path / "o.parquet")
    assert scores["id"].tolist() == [f"img{i}" for i in range(ROWS)]
    _assert_scores(scores, detector, x)


@pytest.mark.parametrize("chunk_rows", [1, 7, 33, ROWS, 10_000])
def test_chunk_boundaries_do_not_change_the_scores(
    tmp_path, rng, capsys, table_bundle, chunk_rows: int
) -> None:
    folder, detector = table_bundle
    x = _rows(np.random.default_rng(3))
    data = _write(pd.DataFrame(x.astype(np.float64), columns=list(FEATURES)), tmp_path / "in.csv")

    code, _, stderr = _detect(
        capsys, folder, data, "--out", tmp_path / "o.csv", "--chunk-rows", str(chunk_rows)
    )

    assert code == 0, stderr
    scores = pd.read_csv(tmp_path / "o.csv")
    assert scores["row"].tolist() == list(range(1, ROWS + 1))  # no id column: the data row number
    _assert_scores(scores, detector, x)


def test_json_summary_counts_what_the_output_holds(tmp_path, rng, capsys, table_bundle) -> None:
    folder, detector = table_bundle
    x = _rows(rng, shift=0.5)  # some rows above the threshold
    data = _write(_frame(x), tmp_path / "in.csv")
    out = tmp_path / "o.csv"

    code, stdout, stderr = _detect(capsys, folder, data, "--out", out, "--json", "--chunk-rows", "7")

    assert code == 0, stderr
    summary = json.loads(stdout)  # stdout is exactly one JSON object
    flags = pd.read_csv(out)["anomaly"]
    assert summary["anomalies"] == int(flags.sum()) > 0
    assert summary["rows_read"] == summary["rows_scored"] == ROWS and summary["rows_skipped"] == 0
    assert summary["anomaly_rate"] == pytest.approx(flags.mean())
    assert summary["threshold"] == pytest.approx(detector.threshold)
    assert summary["threshold_rule"] == "percentile" and summary["anomaly_if"] == "score > threshold"
    assert summary["bundle_id"] == detector.bundle_id and summary["bundle"] == str(folder)
    assert summary["input"] == str(data) and summary["output"] == str(out)
    assert summary["output_format"] == "csv" and summary["id_column"] == "ID"
    assert summary["ignored_columns"] == ["label"] and summary["skipped"] == []
    assert summary["drift"] is None


def test_without_out_only_the_summary_is_printed(tmp_path, rng, capsys, table_bundle) -> None:
    folder, _ = table_bundle
    data = _write(_frame(_rows(rng)), tmp_path / "in.parquet")
    code, stdout, _ = _detect(capsys, folder, data, "--json")
    assert code == 0
    assert json.loads(stdout)["output"] is None and sorted(p.name for p in tmp_path.iterdir()) == [
        "in.parquet"
    ]


def test_ids_are_written_as_given(tmp_path, rng, capsys, table_bundle) -> None:
    folder, _ = table_bundle
    frame = pd.DataFrame(_rows(rng, rows=5).astype(np.float64), columns=list(FEATURES))
    frame.insert(0, "key", ["007", "a,b", "", "x", "1e3"])
    frame.to_csv(tmp_path / "in.csv", index=False)
    code, _, stderr = _detect(
        capsys, folder, tmp_path / "in.csv", "--out", tmp_path / "o.csv", "--id-column", "key"
    )
    assert code == 0, stderr
    written = pd.read_csv(tmp_path / "o.csv", dtype={"key": str}, keep_default_na=False)
    assert written["key"].tolist() == ["007", "a,b", "", "x", "1e3"]


# -- bad input -----------------------------------------------------------------------------------------------
def _bad_cell(frame: pd.DataFrame, row: int, column: str, value: object) -> pd.DataFrame:
    frame = frame.astype({column: object})
    frame.loc[row - 1, column] = value
    return frame


@pytest.mark.parametrize(
    ("source", "case", "needle"),
    [
        ("csv", "missing", "missing column(s) ['c']"),
        ("parquet", "missing", "missing column(s) ['c']"),
        ("csv", "extra", "column 'e': unexpected column(s) ['e']"),
        ("npz", "extra", "column 'e': unexpected column(s) ['e']"),
        ("csv", "text", "row 23, column 'b': value 'oops' is not a number"),
        ("parquet", "text", "row 23, column 'b': value 'oops' is not a number"),
        ("csv", "empty", "row 23, column 'b': value is missing (empty or NaN)"),
        ("parquet", "nan", "row 23, column 'b': value is missing (empty or NaN)"),
        ("npz", "nan", "row 23, column 'b': value is NaN"),
        ("csv", "inf", "row 23, column 'b': value inf is infinite"),
        ("csv", "no-id", "column 'key': no id column 'key' (--id-column)"),
        ("csv", "id-clash", "column 'score': the id column is named like an output column"),
        ("csv", "no-rows", "file has no rows"),
    ],
)
def test_bad_input_exits_2_naming_column_and_row_and_leaves_no_output(
    tmp_path, rng, capsys, table_bundle, source: str, case: str, needle: str
) -> None:
    folder, _ = table_bundle
    frame = _frame(_rows(rng))
    if case == "missing":
        frame = frame.drop(columns=["c"])
    elif case == "extra":
        frame["e"] = 1.0
    elif case == "no-rows":
        frame = frame.iloc[:0]
    elif case == "id-clash":
        frame = frame.rename(columns={"ID": "score"})
    elif case in ("text", "empty", "nan", "inf"):
        value = {"text": "oops", "empty": "", "nan": np.nan, "inf": "inf"}[case]
        frame = _bad_cell(frame, 23, "b", value if source == "csv" or case != "empty" else np.nan)
    if source == "npz":
        names = [c for c in frame.columns if c not in ("ID", "label")]
        path = tmp_path / "in.npz"
        np.savez(path, x=frame[names].to_numpy(np.float64), feature_names=np.array(names))
    else:
        path = _write(frame.astype({"b": str}) if case == "text" else frame, tmp_path / f"in.{source}")
    out = tmp_path / "o.csv"
    extra = {"no-id": ["--id-column", "key"], "id-clash": ["--id-column", "score"]}.get(case, [])

    code, stdout, stderr = _detect(capsys, folder, path, "--out", out, "--chunk-rows", "7", *extra)

    assert code == 2, stderr
    assert needle in stderr and str(path) in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr and stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no output, no temporary


def test_a_failure_late_in_the_file_keeps_an_earlier_result_and_leaves_no_partial_file(
    tmp_path, rng, capsys, table_bundle
) -> None:
    folder, _ = table_bundle
    out = tmp_path / "o.csv"
    out.write_text("an earlier result\n")
    frame = _bad_cell(_frame(_rows(rng)), ROWS - 1, "a", "oops")  # after 14 chunks were written
    data = _write(frame, tmp_path / "in.csv")

    code, _, stderr = _detect(capsys, folder, data, "--out", out, "--chunk-rows", "7")

    assert code == 2 and f"row {ROWS - 1}, column 'a'" in stderr
    assert out.read_text() == "an earlier result\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.csv", "o.csv"]


@pytest.mark.parametrize("source", ["csv", "parquet", "npz"])
def test_skip_mode_drops_bad_rows_counts_them_and_stays_aligned_to_the_id(
    tmp_path, rng, capsys, table_bundle, source: str
) -> None:
    folder, detector = table_bundle
    x = _rows(rng)
    bad = {3: "oops", 23: np.nan, 24: "inf", 98: np.nan}  # 1-based rows; two in one chunk of 7
    if source == "npz":
        x_file = x.astype(np.float64)
        for row, value in bad.items():
            x_file[row - 1, 1] = np.inf if value == "inf" else np.nan
        path = tmp_path / "in.npz"
        np.savez(path, x=x_file, id=np.array([f"r{i:03d}" for i in range(ROWS)]))
    else:
        frame = _frame(x)
        for row, value in bad.items():
            frame = _bad_cell(frame, row, "b", value)
        path = _write(frame if source == "csv" else frame.astype({"b": str}), tmp_path / f"in.{source}")
    out = tmp_path / "o.csv"

    code, stdout, stderr = _detect(
        capsys, folder, path, "--out", out, "--on-invalid", "skip", "--chunk-rows", "7", "--json"
    )

    assert code == 0, stderr
    summary = json.loads(stdout)
    assert (summary["rows_read"], summary["rows_scored"], summary["rows_skipped"]) == (ROWS, ROWS - 4, 4)
    assert [p["row"] for p in summary["skipped"]] == sorted(bad)
    assert {p["column"] for p in summary["skipped"]} == {"b"}
    keep = np.ones(ROWS, bool)
    keep[[row - 1 for row in bad]] = False
    scores = pd.read_csv(out, dtype={"id": str, "ID": str})
    key = "id" if source == "npz" else "ID"
    assert scores[key].tolist() == [f"r{i:03d}" for i in np.flatnonzero(keep)]
    _assert_scores(scores, detector, x[keep])
    assert summary["anomalies"] == int(scores["anomaly"].sum())


def test_skip_mode_still_fails_on_column_problems_and_on_a_file_with_no_valid_row(
    tmp_path, rng, capsys, table_bundle
) -> None:
    folder, _ = table_bundle
    data = _write(_frame(_rows(rng)).drop(columns=["a"]), tmp_path / "in.csv")
    code, _, stderr = _detect(capsys, folder, data, "--on-invalid", "skip")
    assert code == 2 and "missing column(s) ['a']" in stderr
    frame = pd.DataFrame({name: ["x"] * 3 for name in FEATURES})
    data = _write(frame, tmp_path / "all-bad.csv")
    code, _, stderr = _detect(capsys, folder, data, "--on-invalid", "skip", "--out", tmp_path / "o.csv")
    assert code == 2 and "no row could be scored: all 3 rows are invalid" in stderr
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("csv-for-images", "the bundle scores images (6, 6, 1): give an NPZ file"),
        ("wrong-shape", "column 'x': images of shape (5, 6), the bundle expects (6, 6, 1)"),
        ("table-rows", "images of shape (36,), the bundle expects (6, 6, 1)"),
        ("image-nan", "row 4, column 'x': contains NaN or infinite values"),
        ("no-x", "NPZ needs an array named 'x'"),
        ("not-a-zip", "cannot be read as NPZ"),
    ],
)
def test_image_input_problems_exit_2(tmp_path, rng, capsys, image_bundle, case: str, needle: str) -> None:
    folder, _ = image_bundle
    path = tmp_path / "in.npz"
    images = rng.integers(0, 17, size=(20, *IMAGE_SHAPE)).astype(np.float32)
    if case == "csv-for-images":
        path = tmp_path / "in.csv"
        pd.DataFrame(images.reshape(20, -1)).to_csv(path, index=False)
    elif case == "wrong-shape":
        np.savez(path, x=images[:, :5, :, 0])
    elif case == "table-rows":
        np.savez(path, x=images.reshape(20, -1))
    elif case == "image-nan":
        images[3, 2, 2, 0] = np.nan
        np.savez(path, x=images)
    elif case == "no-x":
        np.savez(path, images=images)
    else:
        path.write_bytes(b"not a zip archive")
    code, _, stderr = _detect(capsys, folder, path, "--on-invalid", "fail")
    assert code == 2, stderr
    assert needle in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--out", "o.txt"], "must end in .csv, .parquet or .pq"),
        (["--out", "nowhere/o.csv"], "does not exist"),
        (["--chunk-rows", "0"], "--chunk-rows must be a whole number >= 1"),
    ],
)
def test_bad_options_exit_2_before_the_bundle_is_read(tmp_path, rng, capsys, args, needle: str) -> None:
    data = _write(_frame(_rows(rng)), tmp_path / "in.csv")
    args = [str(tmp_path / a) if a.startswith(("o.", "nowhere")) else a for a in args]
    code, _, stderr = _detect(capsys, tmp_path / "no-bundle", data, *args)  # the bundle is never reached
    assert code == 2 and needle in stderr


# -- the bundle ---------------------------------------------------------------------------------------------
def test_a_tampered_or_missing_bundle_exits_2_with_one_line(tmp_path, rng, capsys, table_bundle) -> None:
    import shutil

    folder, _ = table_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(folder, copy)
    threshold = json.loads((copy / "threshold.json").read_text())
    threshold["threshold"] = 1e9  # nothing would be flagged
    (copy / "threshold.json").write_text(json.dumps(threshold))
    data = _write(_frame(_rows(rng)), tmp_path / "in.csv")

    code, stdout, stderr = _detect(capsys, copy, data, "--out", tmp_path / "o.csv")

    assert code == 2, stderr
    assert "refusing a bundle that does not match its manifest: threshold.json: " in stderr
    assert len(stderr.strip().splitlines()) == 1 and stdout == "" and not (tmp_path / "o.csv").exists()
    code, _, stderr = _detect(capsys, tmp_path / "nowhere", data)
    assert code == 2 and "nowhere: no such bundle folder or .tar.gz" in stderr


def test_a_packed_bundle_scores_like_its_folder(tmp_path, rng, capsys, table_bundle) -> None:
    from shared.detector import pack_bundle

    folder, detector = table_bundle
    archive = pack_bundle(folder, tmp_path / "bundle.tar.gz")
    x = _rows(rng)
    data = _write(_frame(x), tmp_path / "in.csv")
    code, _, stderr = _detect(capsys, archive, data, "--out", tmp_path / "o.csv")
    assert code == 0, stderr
    _assert_scores(pd.read_csv(tmp_path / "o.csv"), detector, x)


def test_robustness_refuses_a_tampered_bundle_the_same_way(tmp_path, rng, capsys, table_bundle) -> None:
    import shutil

    folder, _ = table_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(folder, copy)
    (copy / "metadata.json").write_text("{}")
    data = _write(_frame(_rows(rng)), tmp_path / "test.csv")
    assert main(["robustness", str(copy), "--test", str(data)]) == 2
    assert "metadata.json: " in capsys.readouterr().err


# -- drift --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shift", "alert"), [(0.0, False), (1.5, True)])
def test_drift_alerts_on_a_shifted_file_and_not_on_the_calibration_distribution(
    tmp_path, capsys, table_bundle, shift: float, alert: bool
) -> None:
    folder, _ = table_bundle
    x = _rows(np.random.default_rng(11), rows=600, shift=shift)
    data = _write(pd.DataFrame(x.astype(np.float64), columns=list(FEATURES)), tmp_path / "in.csv")

    code, stdout, stderr = _detect(capsys, folder, data, "--drift", "--json", "--chunk-rows", "64")

    assert code == 0, stderr  # drift is reported, not an error
    drift = json.loads(stdout)["drift"]
    assert drift["alert"] is alert, drift["reason"]
    assert (
        drift["window_size"] == drift["scores_observed"] == 600 and drift["window_is"] == "every scored row"
    )
    assert drift["reason"].startswith("drift: " if alert else "no drift: ")
    assert {"psi", "ks_statistic", "ks_pvalue", "window_cap", "reference_size"} <= set(drift)
    if alert:
        code, stdout, _ = _detect(capsys, folder, data, "--drift")
        assert "drift: ALERT: drift: PSI" in stdout


def test_drift_without_a_reference_in_the_bundle_exits_2(tmp_path, rng, capsys, image_bundle) -> None:
    folder, _ = image_bundle
    np.savez(tmp_path / "img.npz", x=rng.integers(0, 17, size=(10, *IMAGE_SHAPE)))
    code, _, stderr = _detect(capsys, folder, tmp_path / "img.npz", "--drift")
    assert code == 2 and "the bundle has no drift reference" in stderr


# -- the command as a process -----------------------------------------------------------------------------
def test_the_command_as_a_process(tmp_path, rng, table_bundle) -> None:
    folder, _ = table_bundle
    frame = _bad_cell(_frame(_rows(rng)), 5, "d", "n/a")
    data = _write(frame, tmp_path / "in.csv")

    def fedae(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "fedae", "detect", str(folder), str(data), *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )

    failed = fedae("--out", str(tmp_path / "o.csv"))
    assert failed.returncode == 2
    assert failed.stderr.strip().endswith("row 5, column 'd': value 'n/a' is not a number")
    skipped = fedae("--on-invalid", "skip", "--json")
    assert skipped.returncode == 0, skipped.stderr
    assert json.loads(skipped.stdout)["rows_skipped"] == 1


def test_help_says_a_label_column_is_ignored(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["detect", "--help"])
    text = capsys.readouterr().out
    assert "label column" in text and "ignored" in text and "Exit codes" in text


def test_the_progress_bar_goes_to_stderr_and_leaves_stdout_to_the_json(
    tmp_path, rng, capsys, monkeypatch, table_bundle
) -> None:
    import fedae.cli
    import shared.batch_scoring

    folder, _ = table_bundle
    data = _write(_frame(_rows(rng)), tmp_path / "in.csv")
    monkeypatch.setattr(fedae.cli, "PROGRESS_MIN_BYTES", 0)  # every input is "large"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    updates = []
    real = shared.batch_scoring.score_file

    def spy(*args, on_progress, **kwargs):
        def record(done, total):
            updates.append((done, total))
            on_progress(done, total)

        return real(*args, on_progress=record if on_progress else None, **kwargs)

    monkeypatch.setattr(shared.batch_scoring, "score_file", spy)
    code, stdout, stderr = _detect(capsys, folder, data, "--json", "--chunk-rows", "7")
    assert code == 0, stderr
    assert json.loads(stdout)["rows_scored"] == ROWS  # stdout holds the JSON and nothing else
    assert len(updates) == 15 and updates[-1] == (data.stat().st_size,) * 2  # CSV: bytes read


@pytest.mark.parametrize(
    ("name", "column", "needle"),
    [
        ("bools.csv", [True] * ROWS, "value True is not a number"),
        ("dates.parquet", pd.Timestamp("2026-01-01") + pd.to_timedelta(np.arange(ROWS), "s"), "Timestamp"),
        ("durations.parquet", pd.to_timedelta(np.arange(ROWS), "s"), "Timedelta"),
    ],
)
def test_booleans_and_dates_are_not_numbers(
    tmp_path, rng, capsys, table_bundle, name, column, needle
) -> None:
    # They convert to numbers (1, epoch nanoseconds) and would be scored as readings: all anomalies.
    frame = _frame(_rows(rng))
    frame["b"] = column
    code, _, err = _detect(
        capsys, str(table_bundle[0]), str(_write(frame, tmp_path / name)), "--out", str(tmp_path / "o.csv")
    )
    assert code == 2 and "row 1, column 'b'" in err and needle in err
    assert not (tmp_path / "o.csv").exists()


def test_an_npz_id_that_is_not_utf8_exits_2_naming_its_row(tmp_path, rng, capsys, table_bundle) -> None:
    x = _rows(rng)
    ids = np.array([b"ok"] * 10 + [b"\xff"] + [b"ok"] * (ROWS - 11))
    np.savez(tmp_path / "ids.npz", x=x, feature_names=np.array(FEATURES), id=ids)
    code, _, err = _detect(
        capsys, str(table_bundle[0]), str(tmp_path / "ids.npz"), "--out", str(tmp_path / "o.csv")
    )
    assert code == 2 and "row 11" in err and "not UTF-8" in err and "Traceback" not in err
