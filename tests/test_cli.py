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


def _run_folder(tmp_path: Path, dp: bool = True, bundle: bool = False) -> Path:
    import json

    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"privacy": {"dp": dp}, "run_config": {"scenario": "wdbc"}}))
    if bundle:
        (run / "bundle").mkdir()
        (run / "bundle" / "model.keras").write_bytes(b"")
    return run


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no-summary", "no summary.json: not a fedae run folder"),
        ("no-dp", "this run trained without DP: there is no privacy claim to audit"),
        ("no-bundle", "no trained model to attack: bundle/ lacks model.keras, preprocessing.json"),
        ("half-bundle", "bundle/ lacks preprocessing.json"),
        ("bad-guesses", "--guesses must be between 1 and --canaries (10), got 20"),
    ],
)
def test_empirical_audit_of_a_folder_it_cannot_use_exits_2_with_one_line(
    tmp_path, case: str, needle: str
) -> None:
    run = (
        tmp_path / "nowhere"
        if case == "no-summary"
        else _run_folder(tmp_path, case != "no-dp", case == "half-bundle")
    )
    extra = ["--canaries", "10", "--guesses", "20"] if case == "bad-guesses" else []
    result = fedae("privacy", "audit", str(run), "--empirical", *extra)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (run / "privacy-audit.json").exists()


@pytest.mark.slow
def test_empirical_audit_of_a_real_run(tmp_path) -> None:
    import json

    from fedae.cli import main
    from shared.config import FedaeConfig
    from simulations import scenarios
    from simulations.runner import simulate

    # Prepare: a tiny real DP run (wdbc, 2 clients, 1 round).
    run = tmp_path / "run"
    config = FedaeConfig().with_overrides(scenarios.overrides("wdbc"))
    simulate(
        config.replace(
            out_dir=str(run), num_clients=2, num_server_rounds=1, local_epochs=1, robustness_rows=0
        )
    )

    # Execute: as a user runs it, with JSON.
    result = fedae("privacy", "audit", str(run), "--empirical", "--json")

    # Assert: it passes (a correct DP-SGD run), with every figure named and saved.
    assert result.returncode == 0, result.stderr
    audit = json.loads(result.stdout)
    assert audit["audit_passed"] is True
    mi, canary = audit["empirical"]["membership_inference"], audit["empirical"]["canary"]
    assert {"auc", "advantage", "epsilon_lower_bound", "confidence", "upper_bound"} <= set(mi)
    assert {"canaries", "guesses", "correct", "epsilon_lower_bound", "confidence", "ceiling"} <= set(canary)
    assert (canary["canaries"], canary["guesses"], canary["confidence"]) == (1000, 100, 0.95)
    assert canary["ceiling"] == pytest.approx(3.47, abs=0.02)
    assert mi["epsilon_lower_bound"] <= mi["upper_bound"] == pytest.approx(audit["max_epsilon"])
    assert canary["epsilon_lower_bound"] <= canary["upper_bound"]
    # The canary training copies the client's sampling rate and steps, so its epsilon is the client's.
    assert canary["upper_bound"] == pytest.approx(canary["client_epsilon"], rel=0.05)
    assert json.loads((run / "privacy-audit.json").read_text()) == audit

    # Run again as text: every epsilon says which bound it is, and report.md keeps one audit section.
    assert main(["privacy", "audit", str(run), "--empirical"]) == 0
    report = (run / "report.md").read_text()
    assert report.count("<!-- fedae:privacy-audit:begin -->") == 1 and "## Privacy audit" in report
    assert report.index("## Plots") < report.index("## Privacy audit")

    # No model to attack: exit 2.
    (run / "bundle" / "model.keras").unlink()
    assert main(["privacy", "audit", str(run), "--empirical"]) == 2
