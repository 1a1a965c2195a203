"""``fedae privacy audit``: recompute every client's epsilon from its ledger, independently of the run.

Reads ``RUN_DIR/summary.json`` for the run's delta, accountant and state directory, opens each client's
ledger there, and recomputes epsilon per client and training-data fingerprint with both accountants
(dp-accounting RDP and PLD). A figure that cannot be computed (missing or damaged ledger) is an error,
never a number.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shared.data.errors import DataError
from shared.ledger import LEDGER_FILE, LedgerError, PrivacyLedger
from shared.privacy import cumulative_epsilon, describe


@dataclass
class ClientAudit:
    client: int
    dataset_fingerprint: str
    examples: int
    rounds_trained: int
    steps: int
    sigma: float
    sampling_probability: float
    epsilon_rdp: float
    epsilon_pld: float
    epsilon: float  # with the run's accountant
    delta: float
    reported: float | None  # what summary.json says for this client
    budget: float | None  # the run's target-epsilon (None: no budget); a site's node config may differ
    within_budget: bool | None


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise DataError("no summary.json: not a fedae run folder", path=str(run_dir))
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"summary.json is not valid JSON ({err})", path=str(path)) from err


def audit_run(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    summary = _read_summary(run_dir)
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
        rdp = cumulative_epsilon(training, delta, "rdp")
        pld = cumulative_epsilon(training, delta, "pld")
        epsilon = rdp if accountant == "rdp" else pld
        rows.append(
            ClientAudit(
                client=client,
                dataset_fingerprint=",".join(sorted({e.dataset_fingerprint[:12] for e in events})),
                examples=events[-1].num_examples,
                rounds_trained=len(events),
                steps=sum(e.steps for e in events),
                sigma=events[-1].noise_multiplier,
                sampling_probability=events[-1].sampling_probability,
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
    return {
        "run_dir": str(run_dir),
        "statement": describe(delta, accountant, str(config.get("sampling", "poisson"))),
        "delta": delta,
        "accountant": accountant.upper(),
        "clients": [asdict(r) for r in rows],
        "max_epsilon": max(r.epsilon for r in rows),
        "reported_max_epsilon": privacy.get("sample_level", {}).get("max_epsilon"),
        "matches_run": matches,
        "budget": budget,
        "all_within_budget": all(r.within_budget is not False for r in rows),
    }


def format_audit(audit: dict[str, Any]) -> str:
    header = (
        f"{'client':>6} {'examples':>8} {'rounds':>6} {'steps':>6} {'sigma':>6} {'q':>8} "
        f"{'eps RDP':>8} {'eps PLD':>8} {'reported':>9}  data"
    )
    lines = [f"Privacy audit of {audit['run_dir']}", f"Each epsilon: {audit['statement']}.", "", header]
    for r in audit["clients"]:
        reported = "n/a" if r["reported"] is None else f"{r['reported']:.4f}"
        lines.append(
            f"{r['client']:>6} {r['examples']:>8} {r['rounds_trained']:>6} {r['steps']:>6} "
            f"{r['sigma']:>6.3g} {r['sampling_probability']:>8.4g} {r['epsilon_rdp']:>8.4f} "
            f"{r['epsilon_pld']:>8.4f} {reported:>9}  {r['dataset_fingerprint'][:12]}"
        )
    lines += [
        "",
        f"max epsilon ({audit['accountant']}): {audit['max_epsilon']:.4f}",
        f"matches summary.json: {'yes' if audit['matches_run'] else 'NO'}",
        f"budgets: {audit['budgets']}",
    ]
    return "\n".join(lines)
