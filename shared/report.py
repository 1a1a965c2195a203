"""Run outputs: ``summary.json``, PNG plots and ``report.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

# Above this many clients the report lists the worst ones and the plot draws points, not one line each.
MANY_CLIENTS = 20


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

    names.append(_save(_epsilon_figure(summary, plt), out_dir / "epsilon.png"))

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
    robustness = summary.get("robustness") or {}
    if robustness.get("evasion"):
        names.append(_save(_robustness_figure(robustness, plt), out_dir / "robustness.png"))
    return names


def _robustness_figure(robustness: dict[str, Any], plt: Any) -> Any:
    """Detection rate under attacks that hide anomalies, false-alarm rate under attacks on normal rows,
    against the budget, one line per attack; the clean figure at budget 0."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), sharey="row")
    clean = robustness["clean"]
    panels = {
        ("evade", "linf"): (0, 0),
        ("evade", "l2"): (0, 1),
        ("false-alarm", "linf"): (1, 0),
        ("false-alarm", "l2"): (1, 1),
    }
    for (direction, norm), (i, j) in panels.items():
        ax = axes[i][j]
        metric = "detection_rate" if direction == "evade" else "false_alarm_rate"
        for attack in sorted({r["attack"] for r in robustness["evasion"]}):
            rows = sorted(
                (
                    r
                    for r in robustness["evasion"]
                    if (r["attack"], r["norm"], r["direction"]) == (attack, norm, direction)
                ),
                key=lambda r: r["epsilon"],
            )
            if rows:
                xs = [0.0] + [r["epsilon"] for r in rows]
                ax.plot(xs, [clean[metric]] + [r[metric] for r in rows], marker="o", label=attack)
        label = (
            "detection rate (anomalies attacked)"
            if direction == "evade"
            else "false-alarm rate (normal attacked)"
        )
        ax.set(xlabel=f"{norm} budget", ylabel=label, title=f"{direction}, {norm}", ylim=(-0.02, 1.02))
        ax.legend(fontsize=8)
    return fig


def _epsilon_figure(summary: dict[str, Any], plt: Any) -> Any:
    """Each client's cumulative sample-level epsilon after each round it trained in, one line per
    client, with its budget. Client-level epsilon answers another question and is never drawn here."""
    from matplotlib.ticker import MaxNLocator

    p = summary["privacy"]
    fig, ax = plt.subplots(figsize=(6, 4))
    per_client = (p["sample_level"].get("per_client_over_rounds") or {}) if p["dp"] else {}
    if per_client and len(per_client) > MANY_CLIENTS:
        # Hundreds of lines would be unreadable (and slow to draw): every client's points, and the
        # worst client's epsilon after each round as the line that matters for the guarantee.
        points = [(int(r), e) for rounds in per_client.values() for r, e in rounds.items()]
        ax.scatter(*zip(*points, strict=True), s=6, alpha=0.3, label=f"{len(per_client)} clients")
        worst = [
            (r["round"], r["max_epsilon"]) for r in summary["rounds"] if r.get("max_epsilon") is not None
        ]
        if worst:
            ax.plot(*zip(*worst, strict=True), color="C3", marker="o", markersize=3, label="worst client")
    elif per_client:
        for client, rounds in sorted(per_client.items(), key=lambda kv: int(kv[0])):
            xs = [int(r) for r in rounds]
            ax.plot(xs, list(rounds.values()), marker="o", markersize=3, label=f"client {client}")
        budget = (p.get("budget") or {}).get("target_epsilon")
        if budget:
            ax.axhline(budget, color="k", linestyle="--", linewidth=0.8, label="target-epsilon")
        ax.set(
            title=f"Sample-level epsilon per client (delta={p['delta']:g}, {p['accountant']}, "
            f"{p['sampling']})"
        )
        if len(per_client) <= 12 or len(per_client) > MANY_CLIENTS:
            ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no DP-SGD: no sample-level guarantee", ha="center", va="center")
        ax.set(title="Sample-level epsilon per client")
    ax.set(xlabel="round", ylabel="cumulative epsilon")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    return fig


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


def robustness_lines(robustness: dict[str, Any]) -> list[str]:
    """The report's robustness section: what an attacker with each capability achieves, then the table."""
    if not robustness.get("enabled"):
        why = robustness.get("reason", "`robustness-rows = 0`")
        return ["", "## Adversarial robustness", "", f"Not evaluated: {why}."]
    from shared.robustness import headline

    clean = robustness["clean"]

    def said(worst: dict[str, Any], key: str) -> str:
        row = worst.get(key)
        if row is None:
            return "not evaluated"
        metric = "detection_rate" if row["direction"] == "evade" else "false_alarm_rate"
        what = metric.replace("_", " ")
        return (
            f"{row['attack'].upper()} at {row['norm']} {row['epsilon']:g} takes the {what} "
            f"from {clean[metric]:.2f} to {row[metric]:.2f} (it flips {row['success_rate']:.0%} of the "
            "attacked rows the clean detector got right)"
        )

    def auc_said(worst: dict[str, Any], key: str) -> str:
        row = worst.get(key)
        if row is None:
            return "not evaluated"
        return (
            f"{row['attack'].upper()} at {row['norm']} {row['epsilon']:g} takes the ROC-AUC from "
            f"{clean['auc']:.3f} to {row['auc']:.3f}"
        )

    white, scores_only = headline(robustness), headline(robustness, ("spsa",))
    queries = max((r["queries"] for r in robustness["evasion"] if r["attack"] == "spsa"), default=0)
    lines = [
        "",
        "## Adversarial robustness",
        "",
        f"Evasion attacks on {robustness['rows']} test rows ({robustness['anomalous_rows']} anomalous) in "
        f"{robustness['space']}; valid range: {robustness['valid_range']}. Clean on this sample: ROC-AUC "
        f"{clean['auc']:.3f}, detection rate {clean['detection_rate']:.2f}, false-alarm rate "
        f"{clean['false_alarm_rate']:.2f}.",
        "",
        "What an attacker can do. With the model's weights (white box), hiding anomalies: "
        f"{said(white, 'evade linf')}; {said(white, 'evade l2')}. Raising false alarms on normal rows: "
        f"{said(white, 'false-alarm linf')}; {said(white, 'false-alarm l2')}. "
        + (
            f"Both at once (`two-sided`: anomalies hidden and normal rows alarmed): "
            f"{auc_said(white, 'two-sided linf')}; {auc_said(white, 'two-sided l2')}. "
            if any(key.startswith("two-sided") for key in white)
            else ""
        )
        + (
            f"With scores only (a deployed detector, {queries} queries a row), hiding anomalies: "
            f"{said(scores_only, 'evade linf')}; raising false alarms: "
            f"{said(scores_only, 'false-alarm linf')}. "
            if scores_only
            else "No score-only attack was run (`robustness-queries = 0`). "
        )
        + "Random noise of the same size (the `random` rows) shows how much of that is the attack's.",
        "",
        "| attack | norm | epsilon | direction | ROC-AUC | detection rate | false-alarm rate | success "
        "| queries |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {r['attack']} | {r['norm']} | {r['epsilon']:g} | {r['direction']} | {r['auc']:.3f} "
            f"| {r['detection_rate']:.2f} | {r['false_alarm_rate']:.2f} | {r['success_rate']:.2f} "
            f"| {r['queries']} |"
            for r in robustness["evasion"]
        ],
    ]
    return lines


def _incident_lines(rounds: list[dict[str, Any]]) -> list[str]:
    """What went wrong in each round: updates left out (and why), failed replies, rounds not aggregated."""
    lines = []
    for row in rounds:
        for client, reason in (row.get("rejected") or {}).items():
            lines.append(f"- round {row['round']}: client {client}'s update rejected: {reason}")
        for failure in row.get("failed") or []:
            who = f"client {failure['client']}" if failure.get("client") is not None else "a client"
            lines.append(
                f"- round {row['round']}: {who} (node {failure['node']}) failed, error {failure['code']}: "
                f"{failure['reason']}"
            )
        if row.get("not_aggregated"):
            lines.append(f"- round {row['round']}: nothing aggregated ({row['not_aggregated']})")
        if row.get("clipped"):
            clients = ", ".join(str(c) for c in row["clipped"])
            lines.append(
                f"- round {row['round']}: update(s) of client(s) {clients} scaled down to clip-update-norm"
            )
    return ["", "Incidents:", "", *lines] if lines else []


def poisoning_lines(poisoning: dict[str, Any]) -> list[str]:
    """The simulated attack a run ran under, said first so no figure is read as an honest run's."""
    if poisoning.get("attack", "none") == "none":
        return []
    parameter = next(
        (
            f", {name} {poisoning[key]}"
            for key, name in (("scale", "scale"), ("noise_std", "noise std"), ("alie_z", "z ="))
            if poisoning.get(key) is not None
        ),
        "",
    )
    lines = [
        "",
        f"**Simulated poisoning**: clients {', '.join(map(str, poisoning['malicious_clients']))} "
        f"({poisoning['fraction']:.0%} of them) ran the `{poisoning['attack']}` attack{parameter}; every "
        "figure below is under that attack.",
    ]
    if "backdoor_success_rate" in poisoning:
        lines.append(
            f"Backdoor: the exported detector misses {poisoning['backdoor_success_rate']:.0%} of the "
            "held-out test anomalies when they carry the trigger."
        )
    return lines


def _seconds(row: dict[str, Any], key: str) -> str:
    value = (row.get("timing_s") or {}).get(key)
    return "n/a" if value is None else f"{value:.2f}"


def _client_epsilon_lines(per_client: dict[str, float | None], sigmas: dict[str, float]) -> list[str]:
    """One line per client; with many clients the worst ones and the median (all in summary.json)."""
    ordered = sorted(per_client.items(), key=lambda kv: int(kv[0]))
    if len(ordered) > MANY_CLIENTS:
        known = sorted((e, c) for c, e in ordered if e is not None)
        ordered = [(c, e) for e, c in reversed(known[-10:])]
        median = float(np.median([e for e, _ in known])) if known else None
        header = [
            f"- median client: epsilon = {_fmt(median, 3)} over {len(known)} clients that trained; the "
            f"{len(ordered)} highest below (every client: `privacy.sample_level.per_client` in "
            "summary.json)"
        ]
    else:
        header = []
    return header + [
        f"- client {cid}: epsilon = {_fmt(eps, 3)}"
        + (f", noise multiplier {sigmas[cid]:.4g}" if cid in sigmas else "")
        for cid, eps in ordered
    ]


def _budget_line(budget: dict[str, Any]) -> str:
    line = (
        f"Budget: target-epsilon {budget.get('target_epsilon') or 'none'}; clients out of budget: "
        f"{budget.get('exhausted_clients') or 'none'}."
    )
    if budget.get("stopped_early"):
        line += f" The run stopped early: {budget['stopped_early']}."
    return line


def _threshold_release_lines(release: dict[str, Any] | None) -> list[str]:
    """The federated threshold's release: its mechanism, who contributed, what it cost each client."""
    if not release:
        return []
    mechanism = release["mechanism"][0].upper() + release["mechanism"][1:]
    lines = [
        "",
        "### Federated threshold",
        "",
        f"threshold-rule federated-percentile: the {release['percentile']:g}th percentile of the clients' "
        f"own training scores. {mechanism}. Noise multiplier {release['noise_multiplier']:g} per count; "
        f"{release['bins']} log-spaced bins over [{release['score_range'][0]:g}, "
        f"{release['score_range'][1]:g}] plus underflow and overflow; {release['resolution']}.",
        f"{len(release['contributing_clients'])} of {release['clients_asked']} clients contributed "
        f"({release['contributing_clients'] or 'none'}); refused: {list(release['refused']) or 'none'}; "
        f"failed: {[f['node'] for f in release['failed']] or 'none'}.",
    ]
    if release["threshold"] is None:
        lines.append(
            f"**Fallback**: {release['fallback']}; the threshold is the {release['percentile']:g}th "
            "percentile of the coordinator's calibration scores."
        )
    else:
        lines.append(
            f"Threshold {_fmt(release['threshold'], 6)}; the noise alone moves the percentile read by about "
            f"{_fmt(release['noise_sd_percentile_points'], 2)} points (one standard deviation)"
            + (f"; clamped, {release['clamped']}." if release["clamped"] else ".")
        )
    release_eps, after = release["release_epsilon"], release["epsilon_after"]
    lines += [
        "",
        f"Each contributing client's release alone: {release_eps['statement']}; its cumulative epsilon "
        f"afterwards: {after['statement']}.",
        "",
        *[
            f"- client {c}: release epsilon = {_fmt(e, 3)}, cumulative afterwards = "
            f"{_fmt(after['per_client'].get(c), 3)}"
            for c, e in sorted(release_eps["per_client"].items(), key=lambda kv: int(kv[0]))
        ],
    ]
    return lines


def _client_level_lines(client_level: dict[str, Any]) -> list[str]:
    """Client-level DP in its own paragraph: a different neighbouring relation, never mixed in."""
    if not client_level.get("enabled"):
        return ["Client-level DP: off (a whole site's contribution is not protected as a unit)."]
    return [
        "### Client-level DP",
        "",
        f"epsilon = {_fmt(client_level['epsilon'], 3)}: {client_level['statement']}.",
        f"Noise multiplier {client_level['noise_multiplier']:g}, clipping norm {client_level['clip']:g}, "
        f"{client_level['clients_per_round']} of "
        f"{client_level['population']} clients per round. This figure is about one whole client; the "
        "sample-level figures above are about one example of a client's data.",
    ]


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
        *poisoning_lines(summary.get("poisoning") or {}),
        "",
        f"Data protocol: {summary['data_protocol']}",
        "",
        "## Privacy",
        "",
    ]
    sigmas = (p["sample_level"].get("noise_multiplier_per_client") or {}) if p["dp"] else {}
    if p["dp"]:
        lines += [
            f"DP-SGD on every client. {p['statement']}.",
            "",
            f"- worst client: epsilon = {_fmt(p['sample_level']['max_epsilon'], 3)}",
            *_client_epsilon_lines(p["sample_level"]["per_client"], sigmas),
            *(
                [
                    "",
                    "noise-multiplier `auto`: each client calibrated sigma to its own budget and data size.",
                ]
                if p["noise_multiplier"] == "auto"
                else []
            ),
            "",
            f"Not covered: {p['not_covered']}",
            "",
            _budget_line(p.get("budget") or {}),
        ]
    else:
        lines += ["**no DP-SGD**: noise multiplier 0 and no clipping: no sample-level guarantee."]
    lines += _threshold_release_lines(p.get("threshold_release"))
    lines += ["", *_client_level_lines(p.get("client_level") or {})]
    lines += ["", _aggregation_line(summary.get("aggregation") or {})]
    lines += [
        "",
        "## Detector",
        "",
        f"Anomaly score: {d['anomaly_score']}. Threshold {_fmt(d['threshold'], 6)} ({d['threshold_rule']}); "
        + (
            "scales fitted on the coordinator's calibration data, threshold on the clients' noisy histograms "
            "(Privacy, Federated threshold)."
            if (p.get("threshold_release") or {}).get("threshold") is not None
            else "scales and threshold fitted on the coordinator's calibration data."
        ),
        "",
        "| metric | value |",
        "| --- | --- |",
        *[
            f"| {k} | {_fmt(d[k])} |"
            for k in ("test_auc", "test_average_precision", "precision", "recall", "false_alarm_rate")
        ],
        *robustness_lines(summary.get("robustness") or {}),
        "",
        "## Comparison on the same test split",
        "",
        *(
            [
                "| detector | ROC-AUC |",
                "| --- | --- |",
                *[f"| {name} | {_fmt(auc)} |" for name, auc in summary["comparison"].items()],
            ]
            if summary["comparison"]
            else ["Not run (`--no-baselines`)."]
        ),
        "",
        "## Rounds",
        "",
        "Wall time: the whole round; `train` until every train reply is in; `fits`: the clients' local "
        "fits, summed.",
        "",
        "| round | train loss | held-out loss | calibration loss | max epsilon | clients | wall s | train s "
        "| fits s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[
            f"| {r['round']} | {_fmt(r['train_loss'])} | {_fmt(r['eval_loss'])} "
            f"| {_fmt(r['calibration_loss'])} "
            f"| {_fmt(r['max_epsilon'], 3)} | {len(r['clients'])} "
            f"| {_seconds(r, 'round')} | {_seconds(r, 'train')} | {_seconds(r, 'clients_fit_sum')} |"
            for r in summary["rounds"]
        ],
        *_incident_lines(summary["rounds"]),
        "",
        "## Plots",
        "",
        *[f"![{name}]({name})" for name in plots],
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_report_section(path: Path, name: str, markdown: str) -> Path:
    """Put ``markdown`` in ``report.md`` between markers named ``name``, replacing an earlier copy.

    Later commands (``fedae privacy audit --empirical``) add to a run's report this way; running one
    again replaces its section instead of appending a second.
    """
    begin, end = f"<!-- fedae:{name}:begin -->", f"<!-- fedae:{name}:end -->"
    text = path.read_text() if path.is_file() else ""
    start = text.find(begin)
    if start >= 0:
        stop = text.find(end, start)
        if stop < 0:
            from shared.data.errors import DataError

            raise DataError(
                f"section {name!r} has a begin marker but no end marker; fix it by hand", path=str(path)
            )
        text = text[:start] + text[stop + len(end) :].lstrip("\n")
    section = f"{begin}\n{markdown.strip()}\n{end}\n"
    path.write_text(f"{text.rstrip()}\n\n{section}" if text.strip() else section)
    return path
