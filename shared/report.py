"""Run outputs: ``summary.json``, PNG plots and ``report.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np


def _clean(value: Any) -> Any:
    """JSON with ``null`` for NaN (JSON has no NaN), numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_summary(summary: dict[str, Any], out_dir: Path) -> Path:
    path = out_dir / "summary.json"
    path.write_text(json.dumps(_clean(summary), indent=2))
    return path


def write_plots(
    summary: dict[str, Any], test_scores: np.ndarray, y_test: np.ndarray, out_dir: Path
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    names = []
    rounds = summary["rounds"]
    xs = [r["round"] for r in rounds]

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("train_loss", "client train loss"),
        ("eval_loss", "client held-out loss"),
        ("calibration_loss", "server calibration loss"),
    ):
        ys = [r.get(key) for r in rounds]
        if any(v is not None for v in ys):
            ax.plot(xs, [np.nan if v is None else v for v in ys], marker="o", label=label)
    ax.set(xlabel="round", ylabel="reconstruction loss", title="Loss per round")
    ax.legend()
    names.append(_save(fig, out_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    per_round = summary["privacy"]["sample_level"]["per_round_max_epsilon"] or []
    points = [(r, eps) for r, eps in zip(xs, per_round, strict=False) if eps is not None]
    if points:
        ax.plot([r for r, _ in points], [eps for _, eps in points], marker="o")
        ax.set(
            title=f"Worst client's cumulative epsilon (delta={summary['privacy']['delta']:g}, "
            f"{summary['privacy']['accountant']})"
        )
    else:
        ax.text(0.5, 0.5, "no DP: no privacy guarantee", ha="center", va="center")
        ax.set(title="Epsilon per round")
    ax.set(xlabel="round", ylabel="epsilon")
    names.append(_save(fig, out_dir / "epsilon.png"))

    fig, ax = plt.subplots(figsize=(5, 5))
    fpr, tpr, _ = roc_curve(y_test, test_scores)
    ax.plot(fpr, tpr, label=f"federated AE (AUC {summary['detector']['test_auc']:.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC on the test split")
    ax.legend(loc="lower right")
    names.append(_save(fig, out_dir / "roc.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    positive = test_scores[test_scores > 0]
    bins = (
        np.logspace(np.log10(max(positive.min(), 1e-8)), np.log10(positive.max()), 60)
        if positive.size
        else 60
    )
    ax.hist(test_scores[y_test == 0], bins=bins, alpha=0.6, label="normal", density=True)
    ax.hist(test_scores[y_test == 1], bins=bins, alpha=0.6, label="anomaly", density=True)
    ax.axvline(summary["detector"]["threshold"], color="k", linestyle="--", label="threshold")
    ax.set(xscale="log", xlabel="anomaly score", ylabel="density", title="Test anomaly scores")
    ax.legend()
    names.append(_save(fig, out_dir / "errors.png"))
    return names


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _budget_line(budget: dict[str, Any]) -> str:
    line = (
        f"Budget: target-epsilon {budget.get('target_epsilon') or 'none'}; clients out of budget: "
        f"{budget.get('exhausted_clients') or 'none'}."
    )
    if budget.get("stopped_early"):
        line += f" The run stopped early: {budget['stopped_early']}."
    return line


def _aggregation_line(aggregation: dict[str, Any]) -> str:
    if aggregation.get("secure_aggregation", "none") == "none":
        return "Aggregation: plain (the server sees each client's model)."
    return (
        f"Aggregation: {aggregation['secure_aggregation']} (the server sees only the weighted sum of the "
        f"clients' models; {aggregation['num_shares']} shares, reconstruction threshold "
        f"{aggregation['reconstruction_threshold']}, clipping range {aggregation['clipping_range']:g}). "
        f"Not hidden: {aggregation['not_hidden']}"
    )


def write_report(summary: dict[str, Any], plots: list[str], out_dir: Path) -> Path:
    p, d = summary["privacy"], summary["detector"]
    lines = [
        f"# fedae run: {summary['scenario']}",
        "",
        f"{summary['num_clients']} clients, {summary['num_rounds']} rounds, model `{summary['model']}`, "
        f"strategy `{summary['strategy']}`.",
        "",
        f"Data protocol: {summary['data_protocol']}",
        "",
        "## Privacy",
        "",
    ]
    if p["dp"]:
        lines += [
            f"DP-SGD on every client. {p['statement']}.",
            "",
            f"- worst client: epsilon = {_fmt(p['sample_level']['max_epsilon'], 3)}",
            *[
                f"- client {cid}: epsilon = {_fmt(eps, 3)}"
                for cid, eps in sorted(p["sample_level"]["per_client"].items(), key=lambda kv: int(kv[0]))
            ],
            "",
            f"Not covered: {p['not_covered']}",
            "",
            _budget_line(p.get("budget") or {}),
        ]
    else:
        lines += ["**no DP**: noise multiplier 0 and no clipping. This run has no privacy guarantee."]
    lines += ["", _aggregation_line(summary.get("aggregation") or {})]
    lines += [
        "",
        "## Detector",
        "",
        f"Anomaly score: {d['anomaly_score']}. Threshold {_fmt(d['threshold'], 6)} ({d['threshold_rule']}); "
        "scales and threshold fitted on the coordinator's calibration data.",
        "",
        "| metric | value |",
        "| --- | --- |",
        *[
            f"| {k} | {_fmt(d[k])} |"
            for k in ("test_auc", "test_average_precision", "precision", "recall", "false_alarm_rate")
        ],
        "",
        "## Comparison on the same test split",
        "",
        "| detector | ROC-AUC |",
        "| --- | --- |",
        *[f"| {name} | {_fmt(auc)} |" for name, auc in summary["comparison"].items()],
        "",
        "## Rounds",
        "",
        "| round | train loss | held-out loss | calibration loss | max epsilon | clients |",
        "| --- | --- | --- | --- | --- | --- |",
        *[
            f"| {r['round']} | {_fmt(r['train_loss'])} | {_fmt(r['eval_loss'])} "
            f"| {_fmt(r['calibration_loss'])} "
            f"| {_fmt(r['max_epsilon'], 3)} | {len(r['clients'])} |"
            for r in summary["rounds"]
        ],
        "",
        "## Plots",
        "",
        *[f"![{name}]({name})" for name in plots],
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
