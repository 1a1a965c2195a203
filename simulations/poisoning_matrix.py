"""The poisoning scenario matrix: attack x defence x fraction of malicious clients, one simulated
federation per cell, each run as ``fedae simulate`` in its own process.

    uv run python -m simulations.poisoning_matrix --out runs/poisoning            # the documented matrix
    uv run python -m simulations.poisoning_matrix --out DIR --attacks scale:10 --defences fedavg,fedmedian

Every cell's model is judged as it stands after the last round (``RUN_DIR/checkpoint.npz``), not the
exported best-calibration-loss round, which is a server-side choice that can hide an attack's damage;
the exported detector's AUC is kept beside it. Per cell: test ROC-AUC of the final model (threshold and
score scales fitted on the coordinator's calibration rows, as the pipeline does), its mean
reconstruction loss on the test set's normal rows, and the backdoor success rate (triggered test
anomalies the final model misses, on the half of the test anomalies the attacker never held). A cell
whose ``result.json`` exists is not run again (its final model is only evaluated again), so an
interrupted matrix resumes. Writes ``matrix.json``, ``matrix.md`` and ``matrix.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.attacks.poisoning import malicious_clients
from shared.config import ConfigError, FedaeConfig, parse_key_values

logger = logging.getLogger("fedae.simulations")

ATTACKS = "none,scale:10,sign-flip:1,alie,backdoor:10,noise:0.1"
DEFENCES = "fedavg,fedmedian,fedtrimmedavg,norm-bound,krum,multikrum,bulyan"
# 15 sites, so that 20 % is 3 attackers and Bulyan (n >= 4f + 3) still applies. Small sites and 10
# rounds keep a cell near a minute and a half on two cores; 4 local epochs at learning rate 0.002 let the
# clean model converge in them (test ROC-AUC 0.97; 1 epoch at 0.001 stops at 0.79, where a boosted
# update only speeds training up and no attack can be judged).
BASE = {
    "scenario": "fleet",
    "num-clients": 15,
    "rows-per-site": 1000,
    "num-server-rounds": 10,
    "local-epochs": 4,
    "learning-rate": 0.002,
    "robustness-rows": 0,
    "target-epsilon": 0.0,  # every client trains every round: a spent budget would shrink the sample
}
DEFENCE_NAMES = ("fedavg", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan", "norm-bound")
ATTACK_PARAMETER = {"sign-flip": "attack-scale", "scale": "attack-scale", "backdoor": "attack-scale"}
ATTACK_PARAMETER |= {"noise": "attack-noise-std", "alie": "attack-alie-z"}


@dataclass(frozen=True)
class Cell:
    attack: str  # "none", or a name with an optional ":parameter" (scale:10)
    defence: str
    fraction: float
    repeat: int = 1  # the same settings run again: DP noise and initial weights are drawn afresh

    @property
    def name(self) -> str:
        name = f"{self.attack.replace(':', '')}-{self.defence}-{self.fraction:g}"
        return name if self.repeat == 1 else f"{name}-r{self.repeat}"


def attack_overrides(attack: str, fraction: float) -> dict[str, Any]:
    """Run-config keys for ``attack`` ("name" or "name:parameter") run by ``fraction`` of the clients."""
    name, _, parameter = attack.partition(":")
    if name == "none":
        return {"attack": "none", "attack-fraction": 0.0}
    if name not in ATTACK_PARAMETER:
        raise ConfigError(
            f"unknown attack {name!r} in the matrix; known: none, {', '.join(ATTACK_PARAMETER)}"
        )
    overrides: dict[str, Any] = {"attack": name, "attack-fraction": fraction}
    if parameter:
        try:
            overrides[ATTACK_PARAMETER[name]] = float(parameter)
        except ValueError as err:
            raise ConfigError(f"attack {attack!r}: the parameter after ':' must be a number") from err
    return overrides


def defence_overrides(
    defence: str, malicious: int, norm_bound: float | None, num_clients: int = 15
) -> dict[str, Any]:
    """Run-config keys for ``defence``; robust rules are told the true number of attackers (the usual,
    generous assumption): Krum, MultiKrum and Bulyan as f, the trimmed mean as a trim of at least that
    many at each end (its default 20 % where that is enough); ``norm-bound`` is FedAvg with
    clip-update-norm at ``norm_bound``."""
    if defence not in DEFENCE_NAMES:
        raise ConfigError(f"unknown defence {defence!r}; known: {', '.join(DEFENCE_NAMES)}")
    if defence == "norm-bound":
        if norm_bound is None:
            raise ConfigError("the norm-bound defence needs the clean FedAvg cell's update norms first")
        return {"strategy": "fedavg", "clip-update-norm": norm_bound}
    overrides: dict[str, Any] = {"strategy": defence, "num-malicious-nodes": max(1, malicious)}
    if defence == "fedtrimmedavg" and int(FedaeConfig().trim_beta * num_clients) < malicious:
        overrides["trim-beta"] = round((malicious + 0.5) / num_clients, 4)  # Flower trims int(beta * n)
    return overrides


CELL_TIMEOUT_S = 3600  # a cell that hangs is recorded as failed, the matrix goes on


def run_cell(cell: Cell, overrides: dict[str, Any], out: Path, retry: bool = True) -> dict[str, Any]:
    """Run one cell as ``fedae simulate`` in its own process and evaluate its final model. A cell whose
    settings the config refuses (Bulyan with too few clients per attacker) is recorded as not applicable
    without running. A run killed by a signal before its first round is tried once more (``retry``)."""
    cell_dir = out / "cells" / cell.name
    result_path, run_dir = cell_dir / "result.json", cell_dir / "run"
    wanted = json.loads(json.dumps(overrides, default=str))
    if result_path.exists() and json.loads(result_path.read_text()).get("crashed"):
        _set_aside(cell_dir, out)
    if result_path.exists():
        result = json.loads(result_path.read_text())
        if _same_settings(result.get("run_config", {}), wanted):
            # Done before with these settings: only the final model's metrics are taken again
            # (seconds), so they always follow this code's definitions.
            if (run_dir / "checkpoint.npz").exists():
                result |= final_model_metrics(run_dir)
                result_path.write_text(json.dumps(result, indent=2))
            return result
        # Never overwrite a measured cell: its run is evidence someone may be citing.
        raise ConfigError(
            f"{result_path} holds cell {cell.name} run with other settings ({result.get('run_config')}); "
            "use another --out for these settings, or delete that cell to run it again"
        )
    result: dict[str, Any] = {"attack": cell.attack, "defence": cell.defence, "fraction": cell.fraction}
    result["repeat"] = cell.repeat
    result["run_config"] = wanted
    cell_dir.mkdir(parents=True, exist_ok=True)
    try:
        FedaeConfig().with_overrides(overrides)
    except ConfigError as err:
        result |= {"failed": True, "not_applicable": True, "reason": str(err)}
        result_path.write_text(json.dumps(result, indent=2))
        return result
    run_config = " ".join(f"{key}={value}" for key, value in {**overrides, "out-dir": run_dir}.items())
    command = [sys.executable, "-m", "fedae", "simulate", "--no-baselines", "--run-config", run_config]
    logger.info("cell %s: %s", cell.name, run_config)
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=CELL_TIMEOUT_S)
        returncode, stderr = done.returncode, done.stderr
    except subprocess.TimeoutExpired as err:
        returncode, stderr = -1, f"{err.stderr or ''}\nno result after {CELL_TIMEOUT_S} s"
    result["seconds"] = round(time.perf_counter() - started, 1)
    (cell_dir / "simulate.log").write_text(str(stderr))
    summary_path = run_dir / "summary.json"
    if returncode < -1 and not (run_dir / "checkpoint.npz").exists():
        # Killed by a signal before any round was kept (a native crash at start-up, or the OOM
        # killer): that says nothing about the attack, so the cell is run again on resume.
        result |= {"failed": True, "crashed": True, "reason": f"killed by {_signal_name(-returncode)}"}
    elif returncode != 0 or not summary_path.exists():
        # A run the attack broke (every round diverged: nothing exported) is a result too: its last
        # checkpointed model is still judged where there is one.
        errors = [line for line in str(stderr).splitlines() if "error" in line.lower()] or ["no output"]
        result |= {"failed": True, "reason": errors[-1].strip()}
    else:
        summary = json.loads(summary_path.read_text())
        result |= {
            "failed": False,
            "exported_auc": summary["detector"]["test_auc"],
            "exported_round": summary["best_round"],
            "max_update_norm": max((r["max_update_norm"] or 0.0) for r in summary["rounds"]),
            "malicious_clients": summary["poisoning"].get("malicious_clients", []),
        }
    if (run_dir / "checkpoint.npz").exists():
        result |= final_model_metrics(run_dir)
    result_path.write_text(json.dumps(result, indent=2))
    if result.get("crashed") and retry:
        return run_cell(cell, overrides, out, retry=False)
    return result


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _set_aside(cell_dir: Path, out: Path) -> None:
    """Move a crashed cell to ``out/crashed/`` (its log kept as evidence), so that it runs again."""
    aside = out / "crashed"
    aside.mkdir(exist_ok=True)
    taken = [int(p.suffix[1:]) for p in aside.glob(f"{cell_dir.name}.*") if p.suffix[1:].isdigit()]
    attempt = max(taken, default=0) + 1
    target = aside / f"{cell_dir.name}.{attempt}"
    logger.warning(
        "cell %s crashed before its first round last time; kept in %s, running it again",
        cell_dir.name,
        target,
    )
    cell_dir.rename(target)


def _same_settings(saved: dict[str, Any], wanted: dict[str, Any]) -> bool:
    """Whether two cells' overrides make the same run (``4`` and ``"4"`` alike, as the config parses
    them)."""
    try:
        return (
            FedaeConfig().with_overrides(saved).to_run_config()
            == FedaeConfig().with_overrides(wanted).to_run_config()
        )
    except ConfigError:
        return saved == wanted


def final_model_metrics(run_dir: Path) -> dict[str, float]:
    """Test AUC, normal-row reconstruction loss and backdoor success of the run's last global model.

    The AUC is taken on the normal test rows and the half of the anomalies a backdoor attacker never
    holds (``poisoning.measured_anomalies``), in every cell alike, so that no cell is scored on rows an
    attacker trained on."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from shared import pipeline
    from shared.attacks import poisoning
    from shared.checkpoint import load_checkpoint
    from shared.task import trainer_for

    checkpoint = load_checkpoint(run_dir / "checkpoint.npz")
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir}: no checkpoint.npz; the run did not finish a round")
    config = FedaeConfig.from_run_config(checkpoint.run_config)
    setup = pipeline.prepare(config)
    trainer = trainer_for(config, setup.spec, setup.scaler)
    trainer.set_weights(checkpoint.arrays["global"])
    x_calibration = setup.scaler.transform(setup.data.x_calibration)
    x_test, y_test = setup.scaler.transform(setup.data.x_test), setup.data.y_test
    normal, unseen = x_test[y_test == 0], poisoning.measured_anomalies(x_test, y_test)
    x_eval = np.concatenate([normal, unseen])
    y_eval = np.concatenate([np.zeros(len(normal), int), np.ones(len(unseen), int)])
    if not all(np.isfinite(w).all() for w in trainer.get_weights()):
        return {"final_auc": float("nan"), "normal_loss": float("inf"), "backdoor_success": float("nan")}
    scorer, threshold, scores = pipeline.fit_and_score(
        config, trainer.model, trainer.spec, x_calibration, x_eval
    )
    return {
        "final_auc": float(roc_auc_score(y_eval, scores)) if np.isfinite(scores).all() else float("nan"),
        "normal_loss": trainer.mean_loss(normal),
        "backdoor_success": pipeline.backdoor_success(setup, trainer.model, trainer.spec, scorer, threshold),
    }


def run_matrix(
    out: Path,
    attacks: list[str],
    defences: list[str],
    fractions: list[float],
    base: dict[str, Any],
    repeats: int = 1,
) -> list[dict[str, Any]]:
    """Every cell, the clean FedAvg cell first (its update norms set the norm-bound defence); with
    ``repeats`` > 1 the whole matrix again, so that an interrupted run still has complete passes."""
    if repeats < 1:
        raise ValueError(f"--repeats must be 1 or more, got {repeats}")
    FedaeConfig().with_overrides(base)  # bad base keys fail before any cell runs
    num_clients = int(base.get("num-clients", FedaeConfig().num_clients))
    clean = run_cell(Cell("none", "fedavg", 0.0), {**base, **defence_overrides("fedavg", 0, None)}, out)
    if clean.get("failed"):
        raise RuntimeError(f"the clean FedAvg run failed: {clean['reason']}")
    # The bound an operator would pick from honest rounds: the largest honest update norm seen.
    norm_bound = round(clean["max_update_norm"], 4)
    results = [clean]
    for repeat in range(1, repeats + 1):
        for fraction in fractions:
            malicious = len(malicious_clients(num_clients, fraction, int(base.get("seed", 42))))
            for attack in attacks:
                cell_fraction = 0.0 if attack == "none" else fraction
                for defence in defences:
                    cell = Cell(attack, defence, cell_fraction, repeat)
                    if any(r["attack"] == "none" and _same_cell(r, cell) for r in results):
                        continue  # the clean cell does not depend on the fraction
                    if attack == "none" and defence == "fedavg":
                        # Every pass's reference run with repeat 1's settings, whatever the fractions.
                        overrides = {**base, **defence_overrides("fedavg", 0, None)}
                    else:
                        overrides = {
                            **base,
                            **defence_overrides(defence, malicious, norm_bound, num_clients),
                            **attack_overrides(attack, fraction),
                        }
                    results.append(run_cell(cell, overrides, out))
    write_outputs(out, results, norm_bound)
    return results


def _same_cell(result: dict[str, Any], cell: Cell) -> bool:
    return (
        result["attack"] == cell.attack
        and result["defence"] == cell.defence
        and result["fraction"] == cell.fraction
        and result.get("repeat", 1) == cell.repeat
    )


def collected_results(out: Path) -> list[dict[str, Any]]:
    """Every cell's result in ``out`` (from any number of matrix runs), written out as one matrix:
    attacks and defences in the defaults' order, others after them."""
    results = [json.loads(path.read_text()) for path in sorted(out.glob("cells/*/result.json"))]
    clean = [r for r in results if r["attack"] == "none" and r["defence"] == "fedavg" and not r.get("failed")]
    if not clean:
        return []
    attack_order = [a.partition(":")[0] for a in ATTACKS.split(",")]
    defence_order = DEFENCES.split(",")

    def key(r: dict[str, Any]) -> tuple:
        name, defence = r["attack"], r["defence"]
        base, _, parameter = name.partition(":")
        return (
            attack_order.index(base) if base in attack_order else len(attack_order),
            float(parameter or 0),
            defence_order.index(defence) if defence in defence_order else len(defence_order),
            r["fraction"],
            r.get("repeat", 1),
        )

    results.sort(key=key)
    first = next((r for r in clean if r.get("repeat", 1) == 1), clean[0])  # the run that set the bound
    write_outputs(out, results, round(first["max_update_norm"], 4))
    return results


def _cell_text(runs: list[dict[str, Any]], clean_loss: float) -> str:
    """One table cell: a run's final AUC and loss multiple, or over repeats their means and ranges."""
    if not runs:
        return ""
    if any(r.get("not_applicable") for r in runs):
        return "n/a"
    if all(r.get("crashed") for r in runs):
        return "crashed"  # the process died before any round: says nothing about the attack
    measured = [r for r in runs if "final_auc" in r and math.isfinite(r["final_auc"])]
    if not measured:
        return "diverged" if any("final_auc" in r for r in runs) else "failed"
    aucs = [r["final_auc"] for r in measured]
    ratios = [r["normal_loss"] / clean_loss if clean_loss else float("nan") for r in measured]

    def times(ratio: float) -> str:
        # A diverged model's loss can be 1e14 times the clean one: no one reads 15 digits of it.
        return f"{ratio:.2f}x" if ratio < 1000 else f"{ratio:.1e}x"

    if len(measured) == 1:
        text = f"{aucs[0]:.3f} ({times(ratios[0])})"
    else:
        text = (
            f"{statistics.mean(aucs):.3f} ({times(statistics.mean(ratios))}) "
            f"[{min(aucs):.3f}-{max(aucs):.3f}, {times(min(ratios))}-{times(max(ratios))}]"
        )
    if runs[0]["attack"].startswith("backdoor"):
        text += f", bd {statistics.mean(r['backdoor_success'] for r in measured):.2f}"
    if len(runs) == 1:
        return text + (" (run failed)" if runs[0].get("failed") else "")
    diverged = sum(1 for r in runs if "final_auc" in r and not math.isfinite(r["final_auc"]))
    missing = sum(1 for r in runs if "final_auc" not in r)
    broken = sum(1 for r in measured if r.get("failed"))
    notes = [f"{diverged} of {len(runs)} diverged" if diverged else ""]
    notes.append(f"{missing} of {len(runs)} without a model" if missing else "")
    notes.append(f"{broken} of {len(runs)} runs failed" if broken else "")
    return text + "".join(f" ({n})" for n in notes if n)


def write_outputs(out: Path, results: list[dict[str, Any]], norm_bound: float) -> None:
    """matrix.json, matrix.md (a table per fraction) and matrix.png."""
    (out / "matrix.json").write_text(json.dumps({"norm_bound": norm_bound, "cells": results}, indent=2))
    # The reference: clean FedAvg runs that finished with a finite model (a broken repeat is its own
    # finding, not a new baseline).
    cleans = [
        r
        for r in results
        if r["attack"] == "none"
        and r["defence"] == "fedavg"
        and not r.get("failed")
        and math.isfinite(r.get("final_auc", math.nan))
        and math.isfinite(r.get("normal_loss", math.nan))
    ]
    clean = {key: statistics.mean(r[key] for r in cleans) for key in ("final_auc", "normal_loss")}
    clean["backdoor_success"] = statistics.mean(r["backdoor_success"] for r in cleans)
    runs = f" (mean of {len(cleans)} runs)" if len(cleans) > 1 else ""
    defences = list(dict.fromkeys(r["defence"] for r in results))
    attacks = list(dict.fromkeys(r["attack"] for r in results))
    fractions = sorted({r["fraction"] for r in results if r["attack"] != "none"})
    lines = [
        "Final-round test ROC-AUC (normal-row reconstruction loss as a multiple of the clean FedAvg run's;",
        "`bd`: backdoor success, triggered held-out anomalies missed; with repeats, the mean and "
        f"[range] over them). Clean FedAvg{runs}: "
        f"AUC {clean['final_auc']:.3f}, loss {clean['normal_loss']:.4f}, triggered anomalies missed "
        f"{clean['backdoor_success']:.2f}; norm-bound clips at {norm_bound:g}. n/a: settings the rule "
        "cannot run with.",
        "",
    ]
    for fraction in fractions:
        lines += [f"### {fraction:.0%} malicious clients", ""]
        lines.append("| attack | " + " | ".join(defences) + " |")
        lines.append("| --- |" + " --- |" * len(defences))
        for attack in attacks:
            row = []
            for defence in defences:
                match = [
                    r
                    for r in results
                    if r["attack"] == attack
                    and r["defence"] == defence
                    and (attack == "none" or r["fraction"] == fraction)
                ]
                row.append(_cell_text(match, clean["normal_loss"]))
            if any(row):  # an attack not run at this fraction gets no empty row
                lines.append(f"| {attack} | " + " | ".join(row) + " |")
        lines.append("")
    (out / "matrix.md").write_text("\n".join(lines))
    _plot(out / "matrix.png", results, attacks, defences, fractions)


def _finite_mean(values: Any) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.mean(finite) if finite else math.nan


def _plot(
    path: Path, results: list[dict[str, Any]], attacks: list[str], defences: list[str], fractions: list[float]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = max(1, len(fractions))
    figure, axes = plt.subplots(
        1,
        panels + 1,
        figsize=(1.3 * len(defences) * (panels + 1) + 2, 0.5 * len(attacks) + 2.5),
        squeeze=False,
    )
    image = None
    for ax, fraction in zip(axes[0][:panels], fractions or [0.0], strict=True):
        found: dict[tuple[int, int], list[float]] = {}
        for r in results:
            if "final_auc" not in r or (r["attack"] != "none" and r["fraction"] != fraction):
                continue
            found.setdefault((attacks.index(r["attack"]), defences.index(r["defence"])), []).append(
                r["final_auc"]
            )
        grid = np.full((len(attacks), len(defences)), np.nan)
        partial = np.zeros(grid.shape, dtype=bool)
        for (i, j), aucs in found.items():
            grid[i, j] = _finite_mean(aucs)  # as the table: the finite runs' mean
            partial[i, j] = 0 < sum(map(math.isfinite, aucs)) < len(aucs)
        image = ax.imshow(grid, vmin=0.5, vmax=1.0, cmap="viridis")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(
                j,
                i,
                "x" if np.isnan(value) else f"{value:.2f}" + ("*" if partial[i, j] else ""),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if np.isnan(value) or value < 0.8 else "black",
            )
        ax.set_xticks(range(len(defences)), defences, rotation=30, ha="right")
        ax.set_yticks(range(len(attacks)), attacks)
        ax.set_title(f"final test ROC-AUC, {fraction:.0%} malicious (* some runs diverged)")
    # Backdoor success per defence: each backdoor cell beside the clean cell (the trigger alone).
    bars = axes[0][panels]
    labels = [("clean", lambda r: r["attack"] == "none")]
    labels += [
        (f"{a}, {f:.0%}", lambda r, a=a, f=f: r["attack"] == a and r["fraction"] == f)
        for a in attacks
        if a.startswith("backdoor")
        for f in fractions
    ]
    width = 0.8 / len(labels)
    for k, (label, chosen) in enumerate(labels):
        values = [
            _finite_mean(
                r.get("backdoor_success", math.nan) for r in results if r["defence"] == d and chosen(r)
            )
            for d in defences
        ]
        bars.bar(np.arange(len(defences)) + k * width, values, width, label=label)
    bars.set_xticks(np.arange(len(defences)) + 0.4 - width / 2, defences, rotation=30, ha="right")
    bars.set_ylim(0, 1)
    bars.set_title("backdoor success (triggered anomalies missed)")
    bars.legend(fontsize=8)
    if image is not None:
        figure.colorbar(image, ax=axes[0][:panels].tolist(), shrink=0.8)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.poisoning_matrix", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (cells resume from it)")
    parser.add_argument(
        "--attacks", default=ATTACKS, help=f"comma-separated name[:parameter] (default {ATTACKS})"
    )
    parser.add_argument("--defences", default=DEFENCES, help=f"comma-separated (default {DEFENCES})")
    parser.add_argument("--fractions", default="0.2", help="fractions of malicious clients (default 0.2)")
    parser.add_argument("--run-config", default="", help="overrides of the base settings, key=value ...")
    parser.add_argument(
        "--repeats", type=int, default=1, help="run every cell this many times (the table gives ranges)"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write the table and plot from every cell already in --out",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.report_only:
        results = collected_results(args.out)
        if not results:
            print(f"error: no cells in {args.out}", file=sys.stderr)
            return 2
        print((args.out / "matrix.md").read_text())
        return 0
    try:
        fractions = [float(f) for f in args.fractions.split(",") if f.strip()]
        base = {**BASE, **parse_key_values(args.run_config)}
        results = run_matrix(
            args.out,
            [a.strip() for a in args.attacks.split(",") if a.strip()],
            [d.strip() for d in args.defences.split(",") if d.strip()],
            fractions,
            base,
            args.repeats,
        )
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # the clean FedAvg cell failed: nothing else can be judged against it
        print(f"error: {err}", file=sys.stderr)
        return 1
    print((args.out / "matrix.md").read_text())
    print(f"{len(results)} cells; matrix.json, matrix.md and matrix.png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
