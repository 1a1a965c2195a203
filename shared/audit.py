"""``fedae privacy audit``: recompute every client's epsilon from its ledger, independently of the run.

Reads ``RUN_DIR/summary.json`` for the run's delta, accountant and state directory, opens each client's
ledger there, and recomputes epsilon per client and training-data fingerprint with both accountants
(dp-accounting RDP and PLD). A figure that cannot be computed (missing or damaged ledger) is an error,
never a number. DP-SGD trainings and the federated threshold's histogram releases (ledger ``mechanism``)
compose into each client's one epsilon, and are listed apart: the training columns count trainings only,
and every histogram release is named with its run, noise multiplier and row count. These are UPPER
bounds; ``--empirical`` adds LOWER bounds from attacks (``shared.empirical``), and this module formats
and saves the combined result.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.data.errors import DataError
from shared.ledger import LEDGER_FILE, LedgerError, PrivacyLedger
from shared.privacy import NEIGHBOURING, cumulative_epsilon, describe


@dataclass
class ClientAudit:
    client: int
    dataset_fingerprint: str
    examples: int
    rounds_trained: int  # DP-SGD trainings
    steps: int
    sigma: float | None  # the latest training's (None: the ledger holds no training)
    sampling_probability: float | None
    histograms: list[dict[str, Any]]  # the threshold histogram releases: run, sigma, rows, time
    epsilon_rdp: float
    epsilon_pld: float
    epsilon: float  # with the run's accountant
    delta: float
    reported: float | None  # what summary.json says for this client
    budget: float | None  # the run's target-epsilon (None: no budget); a site's node config may differ
    within_budget: bool | None


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise DataError("no summary.json: not a fedae run folder", path=str(run_dir))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"summary.json is not valid JSON ({err})", path=str(path)) from err


def audit_run(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    config = summary.get("run_config", {})
    privacy = summary.get("privacy", {})
    if not privacy.get("dp"):
        raise DataError("this run trained without DP: there is no privacy loss to audit", path=str(run_dir))
    delta, accountant = float(config["delta"]), str(config["accountant"])
    budget = float(config.get("target-epsilon") or 0.0) or None
    state_dir = Path(config.get("state-dir") or run_dir / "state")
    reported = privacy.get("sample_level", {}).get("per_client", {})
    paths = {int(p.parent.name.removeprefix("client-")): p for p in state_dir.glob(f"client-*/{LEDGER_FILE}")}
    # Every client the run reports and every ledger in the state folder: a client that never got a
    # figure into the summary (it refused, or its reply was lost) still has its ledger read.
    clients = sorted(set(paths) | {int(c) for c in reported})
    if not clients:
        raise DataError("no client ledgers and no per-client figures: nothing to audit", path=str(state_dir))
    rows: list[ClientAudit] = []
    for client in clients:
        path = paths.get(client, state_dir / f"client-{client}" / LEDGER_FILE)
        try:
            with PrivacyLedger(path, create=False) as ledger:
                events = ledger.events()
        except LedgerError as err:
            raise DataError(str(err)) from err
        if not events:
            raise DataError(f"client {client}'s ledger holds no event", path=str(path))
        training = [e.training_event() for e in events]
        if len({e.sampling for e in training}) > 1:
            raise DataError(
                f"client {client}'s ledger mixes Poisson and shuffled events: their bounds hold for "
                "different neighbouring relations, so no epsilon can be stated for it",
                path=str(path),
            )
        rdp = cumulative_epsilon(training, delta, "rdp")
        pld = cumulative_epsilon(training, delta, "pld")
        epsilon = rdp if accountant == "rdp" else pld
        trainings = [e for e in events if e.mechanism == "dp-sgd"]
        rows.append(
            ClientAudit(
                client=client,
                dataset_fingerprint=",".join(sorted({e.dataset_fingerprint[:12] for e in events})),
                examples=events[-1].num_examples,
                rounds_trained=len(trainings),
                steps=sum(e.steps for e in trainings),
                sigma=trainings[-1].noise_multiplier if trainings else None,
                sampling_probability=trainings[-1].sampling_probability if trainings else None,
                histograms=[
                    {
                        "run_id": e.run_id,
                        "noise_multiplier": e.noise_multiplier,
                        "num_examples": e.num_examples,
                        "recorded_at": e.recorded_at,
                    }
                    for e in events
                    if e.mechanism == "histogram"
                ],
                epsilon_rdp=rdp,
                epsilon_pld=pld,
                epsilon=epsilon,
                delta=delta,
                reported=reported.get(str(client)),
                budget=budget,
                within_budget=None if budget is None else epsilon <= budget * (1 + 1e-9),
            )
        )
    # Each client's figure in the run must be its whole ledger's epsilon: a ledger holding more (a later
    # run on the same state-dir, a client the run did not hear back from) is a mismatch worth showing.
    matches = all(r.reported is not None and math.isclose(r.epsilon, r.reported, rel_tol=1e-6) for r in rows)
    client_level = audit_client_level(privacy.get("client_level") or {})
    matches = matches and (client_level is None or client_level["matches_run"])
    released = any(r.histograms for r in rows)
    return {
        "run_dir": str(run_dir),
        "bound": "upper (accountant, recomputed from the ledgers)",
        "statement": describe(delta, accountant, str(config.get("sampling", "poisson")), released),
        "delta": delta,
        "accountant": accountant.upper(),
        "clients": [asdict(r) for r in rows],
        "max_epsilon": max(r.epsilon for r in rows),
        "reported_max_epsilon": privacy.get("sample_level", {}).get("max_epsilon"),
        "matches_run": matches,
        "budget": budget,
        "all_within_budget": all(r.within_budget is not False for r in rows),
        "sampling": str(config.get("sampling", "poisson")),
        "client_level": client_level,
    }


def audit_client_level(reported: dict[str, Any]) -> dict[str, Any] | None:
    """Recompute the run's client-level epsilon from its stated mechanism, independently of Flower.

    ``releases`` Gaussian mechanisms at the client-level noise multiplier, no amplification by client
    sampling, add/remove one client: dp-accounting's RDP, the same model Flower's RdpAccountant uses.
    Kept apart from the sample-level rows: it bounds a different neighbouring relation.
    """
    if not reported.get("enabled"):
        return None
    import dp_accounting
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    releases = int(reported["releases"])
    accountant.compose(dp_accounting.GaussianDpEvent(float(reported["noise_multiplier"])), releases)
    recomputed = float(accountant.get_epsilon(float(reported["delta"]))) if releases else 0.0
    return {
        "statement": reported["statement"],
        "releases": releases,
        "epsilon": recomputed,
        "reported": reported["epsilon"],
        # Flower's RDP uses its own order grid: agreement to 2% is what two RDP conversions give.
        "matches_run": math.isclose(recomputed, float(reported["epsilon"]), rel_tol=0.02, abs_tol=1e-9),
        "target_epsilon": reported.get("target_epsilon"),
    }


def format_audit(audit: dict[str, Any]) -> str:
    header = (
        f"{'client':>6} {'examples':>8} {'rounds':>6} {'steps':>6} {'sigma':>6} {'q':>8} {'hist':>4} "
        f"{'eps RDP':>8} {'eps PLD':>8} {'delta':>7} {'budget':>7} {'reported':>9} {'status':>11}  data"
    )
    lines = [
        f"Privacy audit of {audit['run_dir']}",
        f"Each epsilon below is an UPPER bound (accountant, from the ledgers): {audit['statement']}.",
        "",
        header,
    ]
    for r in audit["clients"]:
        reported = "n/a" if r["reported"] is None else f"{r['reported']:.4f}"
        budget_cell = "none" if r["budget"] is None else f"{r['budget']:g}"
        status = {None: "no budget", True: "within", False: "OVER BUDGET"}[r["within_budget"]]
        sigma = "n/a" if r["sigma"] is None else f"{r['sigma']:.3g}"
        q = "n/a" if r["sampling_probability"] is None else f"{r['sampling_probability']:.4g}"
        lines.append(
            f"{r['client']:>6} {r['examples']:>8} {r['rounds_trained']:>6} {r['steps']:>6} "
            f"{sigma:>6} {q:>8} {len(r['histograms']):>4} {r['epsilon_rdp']:>8.4f} "
            f"{r['epsilon_pld']:>8.4f} {r['delta']:>7.0e} {budget_cell:>7} {reported:>9} {status:>11}  "
            f"{r['dataset_fingerprint'][:12]}"
        )
    releases = [(r["client"], h) for r in audit["clients"] for h in r["histograms"]]
    if releases:
        lines += [
            "",
            "Histogram events (mechanism 'histogram': the federated threshold's Gaussian release of a "
            "client's score counts, one each, composed into the epsilons above; 'rounds', 'steps', "
            "'sigma' and 'q' are the DP-SGD trainings'):",
            *[
                f"  client {client}: histogram release, run {h['run_id']}, noise multiplier "
                f"{h['noise_multiplier']:g}, {h['num_examples']} rows, recorded {h['recorded_at']}"
                for client, h in releases
            ],
        ]
    budget = "none" if audit["budget"] is None else f"target-epsilon {audit['budget']:g}"
    lines += [
        "",
        f"max epsilon ({audit['accountant']}): {audit['max_epsilon']:.4f}",
        f"matches summary.json: {'yes' if audit['matches_run'] else 'NO'}",
        f"budget: {budget}; every client within it: {'yes' if audit['all_within_budget'] else 'NO'}",
    ]
    client_level = audit.get("client_level")
    if client_level:
        lines += [
            "",
            "Client-level (a different guarantee, never combined with the above): "
            f"{client_level['statement']}",
            f"  recomputed epsilon {client_level['epsilon']:.4f} (dp-accounting RDP), reported "
            f"{client_level['reported']:.4f}: {'match' if client_level['matches_run'] else 'MISMATCH'}",
        ]
    return "\n".join(lines)


AUDIT_FILE = "privacy-audit.json"


def check_empirical_inputs(run_dir: str | Path) -> None:
    """Refuse, before any ledger is read or TensorFlow loaded, a folder the empirical audit cannot use."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    if not summary.get("privacy", {}).get("dp"):
        raise DataError("this run trained without DP: there is no privacy claim to audit", path=str(run_dir))
    if "run_config" not in summary:
        raise DataError(
            "summary.json has no run_config: the run's data cannot be regenerated", path=str(run_dir)
        )
    if summary["run_config"].get("sampling", "poisson") != "poisson":
        # The attacks test adding or removing one example (the canary training changes n); a shuffled
        # run's bound is for replacing one: the two figures would not be about the same guarantee.
        raise DataError(
            "the empirical audit compares add/remove-one lower bounds with the accountant's bound; this "
            "run used shuffled batches, whose bound is replace-one: not comparable, so not run",
            path=str(run_dir),
        )
    missing = [n for n in ("model.keras", "preprocessing.json") if not (run_dir / "bundle" / n).is_file()]
    if missing:
        raise DataError(
            f"no trained model to attack: bundle/ lacks {', '.join(missing)}", path=str(run_dir / "bundle")
        )


def with_empirical(audit: dict[str, Any], empirical: dict[str, Any]) -> dict[str, Any]:
    """The ledger audit plus the attacks; ``audit_passed`` needs every check to hold."""
    return {
        **audit,
        "empirical": empirical,
        "audit_passed": bool(audit["matches_run"] and audit["all_within_budget"] and empirical["passed"]),
    }


def _bound(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_empirical(audit: dict[str, Any]) -> str:
    """The attacks' lower bounds beside the accountant's upper bounds, for the terminal."""
    e = audit["empirical"]
    mi, c = e["membership_inference"], e["canary"]
    confidence = f"{e['confidence']:.0%}"
    lines = [
        "",
        f"Empirical audit: each epsilon is sample-level ({NEIGHBOURING[audit.get('sampling', 'poisson')]}), "
        "per client, "
        f"delta={e['delta']:g}; LOWER bounds come from attacks ({confidence} confidence), UPPER bounds "
        "from the accountant.",
        "",
        f"{'attack':<36} {'lower bound':>11} {'upper bound':>11}  upper bound is",
        f"{'membership inference (final model)':<36} {_bound(mi['epsilon_lower_bound']):>11} "
        f"{_bound(mi['upper_bound']):>11}  {mi['upper_bound_is']}",
        f"{'one-run canaries (client ' + str(c['client']) + ')':<36} {_bound(c['epsilon_lower_bound']):>11} "
        f"{_bound(c['upper_bound']):>11}  {c['upper_bound_is']}",
        "",
        f"membership inference: ROC-AUC {mi['auc']:.4f}, advantage {mi['advantage']:.4f} "
        f"({mi['members']} members, {mi['non_members']} non-members; 0.5 and 0 = no leak seen)",
        f"canaries: {c['correct']} of {c['guesses']} guesses right on {c['canaries']} canaries "
        f"({c['included']} included); ceiling {c['ceiling']:.4f} (all {c['guesses']} right); "
        f"{c['steps']} steps, q={c['sampling_probability']:.4g}, sigma={c['noise_multiplier']:g}, "
        f"C={c['l2_norm_clip']:g}",
        "A lower bound at or below its upper bound is consistent with the claim; it does not prove it.",
        f"empirical audit: {'passed' if e['passed'] else 'FAILED (a lower bound is above its upper bound)'}",
    ]
    return "\n".join(lines)


def audit_markdown(audit: dict[str, Any]) -> str:
    """The report.md section: both kinds of bound, what they are, and the verdict."""
    e = audit["empirical"]
    mi, c = e["membership_inference"], e["canary"]
    verdict = "passed" if audit["audit_passed"] else "**FAILED**"
    return "\n".join(
        [
            "## Privacy audit",
            "",
            f"`fedae privacy audit --empirical`: {verdict}. Every epsilon is sample-level "
            f"({NEIGHBOURING[audit.get('sampling', 'poisson')]}), per client, at delta = {e['delta']:g}. "
            "Upper bounds are the "
            f"accountant's ({audit['accountant']}, recomputed from the clients' ledgers); lower bounds come "
            f"from attacks at {e['confidence']:.0%} confidence.",
            "",
            "| check | epsilon lower bound (attack) | epsilon upper bound (accountant) | details |",
            "| --- | --- | --- | --- |",
            f"| membership inference on the final model | {_bound(mi['epsilon_lower_bound'])} "
            f"| {_bound(mi['upper_bound'])} (worst client) | ROC-AUC {mi['auc']:.4f}, advantage "
            f"{mi['advantage']:.4f}, {mi['members']} members / {mi['non_members']} non-members |",
            f"| one-run canary audit, client {c['client']} | {_bound(c['epsilon_lower_bound'])} "
            f"| {_bound(c['upper_bound'])} (this training) | {c['correct']} / {c['guesses']} guesses right, "
            f"{c['canaries']} canaries, ceiling {c['ceiling']:.4f} |",
            "",
            f"Ledgers match summary.json: {'yes' if audit['matches_run'] else 'no'}; every client within "
            f"budget: {'yes' if audit['all_within_budget'] else 'no'}. A lower bound at or below its upper "
            "bound is consistent with the claim but does not prove it (docs/PRIVACY.md, Empirical audit).",
        ]
    )


def save_audit(run_dir: str | Path, audit: dict[str, Any]) -> Path:
    """Write ``RUN_DIR/privacy-audit.json`` and the report's privacy-audit section; returns the JSON path."""
    from shared.report import write_report_section

    run_dir = Path(run_dir)
    path = run_dir / AUDIT_FILE
    # allow_nan=False: a NaN or infinite figure is a bug to surface, not a value to store.
    path.write_text(json.dumps(audit, indent=2, allow_nan=False))
    write_report_section(run_dir / "report.md", "privacy-audit", audit_markdown(audit))
    return path
