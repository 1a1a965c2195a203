"""``fedae privacy audit`` on ledgers that hold threshold histogram releases beside DP-SGD trainings."""

import json

import pytest

from fedae.cli import main
from shared.audit import audit_run, format_audit
from shared.config import FedaeConfig
from shared.ledger import LedgerEvent, PrivacyLedger, ledger_path
from shared.privacy import cumulative_epsilon


def _run_with_a_threshold_release(run_dir, reported_extra: float = 0.0) -> dict[int, float]:
    """A run folder as a federated-percentile run leaves it: two clients, two trainings each, then one
    histogram release each; summary.json reports each client's whole ledger (plus ``reported_extra``)."""
    config = FedaeConfig(threshold_rule="federated-percentile", state_dir=str(run_dir / "state"))
    epsilons = {}
    for client in (0, 1):
        events = [
            LedgerEvent("run-1", r, "f" * 64, 3400, 1.5, 64 / 3400, 54, 0.25, recorded_at=f"t{r}")
            for r in (1, 2)
        ]
        events.append(LedgerEvent("run-1", 0, "f" * 64, 3400, 5.0, 1.0, 1, 1.0, mechanism="histogram"))
        with PrivacyLedger(ledger_path(run_dir / "state", client)) as ledger:
            for event in events:
                ledger.record(event)
        epsilons[client] = cumulative_epsilon([e.training_event() for e in events], config.delta)
    summary = {
        "run_config": config.to_run_config(),
        "privacy": {
            "dp": True,
            "sample_level": {
                "per_client": {str(c): e + reported_extra for c, e in epsilons.items()},
                "max_epsilon": max(epsilons.values()),
            },
        },
    }
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return epsilons


def test_the_audit_composes_histogram_releases_and_lists_them_as_such(tmp_path, capsys) -> None:
    epsilons = _run_with_a_threshold_release(tmp_path)
    audit = audit_run(tmp_path)
    assert audit["matches_run"] and "threshold histogram" in audit["statement"]
    for row in audit["clients"]:
        assert row["epsilon"] == pytest.approx(epsilons[row["client"]])
        # The training columns count trainings; the release is listed on its own.
        assert (row["rounds_trained"], row["steps"], row["sigma"]) == (2, 108, 1.5)
        (release,) = row["histograms"]
        assert (release["run_id"], release["noise_multiplier"], release["num_examples"]) == (
            "run-1",
            5.0,
            3400,
        )
    text = format_audit(audit)
    assert " hist " in text.splitlines()[3]
    assert text.count("histogram release, run run-1, noise multiplier 5, 3400 rows") == 2
    assert main(["privacy", "audit", str(tmp_path)]) == 0
    assert "client 1: histogram release" in capsys.readouterr().out


def test_an_audit_of_a_run_that_did_not_count_the_release_flags_the_mismatch(tmp_path) -> None:
    _run_with_a_threshold_release(tmp_path, reported_extra=-0.1)  # as if the release were left out
    assert not audit_run(tmp_path)["matches_run"]
    assert main(["privacy", "audit", str(tmp_path), "--json"]) == 1
