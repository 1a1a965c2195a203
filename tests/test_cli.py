"""The `fedae` command as a user runs it: a real process, its exit code and its one-line errors."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def fedae(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedae", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_scenarios_lists_every_scenario_file() -> None:
    result = fedae("scenarios")
    assert result.returncode == 0
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == sorted(p.stem for p in (ROOT / "simulations" / "scenarios").glob("*.toml"))
    assert {"fleet", "digits", "wdbc"} <= set(names)


def _sites(tmp_path: Path, bad_cell: bool = False) -> tuple[Path, Path]:
    data = tmp_path / "sites"
    data.mkdir()
    for site in range(2):
        frame = pd.DataFrame({"a": range(100), "b": range(100)}, dtype=float)
        if bad_cell and site == 1:
            frame = frame.astype(object)
            frame.loc[41, "b"] = "n/a"
        frame.to_csv(data / f"site{site}.csv", index=False)
    test = tmp_path / "test.csv"
    pd.DataFrame({"a": range(20), "b": range(20), "label": [0] * 15 + [1] * 5}).to_csv(test, index=False)
    return data, test


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("bad-cell", "site1.csv, row 42, column 'b': value 'n/a' is not a number"),
        ("missing-dir", "data directory does not exist"),
        ("missing-test", "test.csv: file does not exist"),
        ("bad-key", "unknown run-config key(s) ['epochs']"),
        ("bad-value", "noise-multiplier must be a number, got 'lots'"),
        ("too-few-rows", "fewer than batch-size 500"),
        ("big-delta", "delta 0.1 must be below 1/n"),
        ("secagg-two-sites", "secagg-num-shares (3) is more than the 2 client(s) sampled per round"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(tmp_path, case: str, needle: str) -> None:
    data, test = _sites(tmp_path, bad_cell=case == "bad-cell")
    args = ["simulate", "--data", str(data), "--test", str(test), "--out", str(tmp_path / "run")]
    if case == "missing-dir":
        args[2] = str(tmp_path / "nowhere")
    if case == "missing-test":
        test.unlink()
    extra = {
        "bad-key": "epochs=3",
        "bad-value": "noise-multiplier=lots",
        "too-few-rows": "batch-size=500",
        "big-delta": "delta=0.1 batch-size=8",
        "secagg-two-sites": "secure-aggregation='secagg+'",  # one client per file: known from the data
    }.get(case)
    if extra:
        args += ["--run-config", extra]
    result = fedae(*args)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "summary.json").exists()
