"""``fedae bundle inspect``: what a bundle holds, read only after its files are checked.

Everything shown comes from the bundle's own files (manifest, metadata, threshold, drift reference);
the model is not loaded, so inspecting is fast and runs nothing from the bundle. A bundle whose files do
not match its manifest is refused like ``load_bundle`` refuses it: figures read from a changed file would
be the tamperer's, not the run's.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from shared.detector import DRIFT_FILE, MANIFEST, bundle_id, checked_copy


def describe_bundle(path: str | Path) -> dict[str, Any]:
    """The checked bundle (folder or ``.tar.gz``) as one JSON-ready dict, read from a checked private
    copy (what is shown is what was checked)."""
    with tempfile.TemporaryDirectory(prefix="fedae-inspect-") as scratch:
        return {"bundle": str(path), **_describe_folder(checked_copy(path, Path(scratch)))}


def _describe_folder(folder: Path) -> dict[str, Any]:
    manifest = json.loads((folder / MANIFEST).read_text())
    metadata = json.loads((folder / "metadata.json").read_text())
    threshold = json.loads((folder / "threshold.json").read_text())
    drift = json.loads((folder / DRIFT_FILE).read_text()) if (folder / DRIFT_FILE).is_file() else None
    return {
        "verified": True,  # verify_bundle raised otherwise
        "bundle_id": bundle_id(folder),
        "format": manifest.get("format"),
        "created": manifest.get("created"),
        "versions": manifest.get("versions", {}),
        "model": metadata.get("model", {}),
        "input_schema": metadata.get("input_schema", {}),
        "threshold": {
            "value": threshold.get("threshold"),
            "rule": metadata.get("threshold_rule", threshold.get("rule")),
            "score": threshold.get("score"),
            "anomaly_if": threshold.get("anomaly_if"),
        },
        "privacy": privacy_headline(metadata.get("privacy", {})),
        "robustness": metadata.get("robustness", {"enabled": False}),
        "training_run": {
            k: v
            for k, v in metadata.get("training_run", {}).items()
            if k in ("scenario", "rounds", "clients", "strategy", "best_round", "created")
        },
        "exports": metadata.get("exports", {}),
        "drift_reference": None
        if drift is None
        else {"bins": len(drift["proportions"]), "reference_scores": drift["reference_size"]},
        "files": manifest["files"],
    }


def privacy_headline(privacy: dict[str, Any]) -> dict[str, Any]:
    """The sample-level and client-level figures, each with its own statement (never one number)."""
    if not privacy.get("dp"):
        sample = {"epsilon": None, "statement": "no DP-SGD: no sample-level guarantee"}
    else:
        sample = {
            "epsilon": privacy.get("sample_level", {}).get("max_epsilon"),
            "delta": privacy.get("delta"),
            "accountant": privacy.get("accountant"),
            "statement": "worst client's " + str(privacy.get("statement", "")),
        }
    client = privacy.get("client_level", {"enabled": False})
    if client.get("enabled"):
        client_level = {k: client.get(k) for k in ("epsilon", "delta", "accountant", "statement")}
    else:
        client_level = {"epsilon": None, "statement": "no client-level DP in this run"}
    return {"sample_level": sample, "client_level": client_level, "not_covered": privacy.get("not_covered")}


def format_bundle(info: dict[str, Any]) -> str:
    """The description as the terminal shows it."""
    model, schema, threshold = info["model"], info["input_schema"], info["threshold"]
    features = schema.get("feature_names") or []
    layout = f"{len(features)} features" if features else f"images of shape {schema.get('shape')}"
    sample, client = info["privacy"]["sample_level"], info["privacy"]["client_level"]
    lines = [
        f"bundle      {info['bundle']}  ({info['bundle_id']}, format {info['format']}, checksums verified)",
        f"created     {info['created']}  by "
        + ", ".join(f"{name} {version}" for name, version in info["versions"].items() if version),
        f"model       {model.get('kind')} autoencoder, latent {model.get('latent_dim')}, input {layout}",
        f"threshold   {threshold['value']:.6g} ({threshold['rule']}); anomaly if {threshold['anomaly_if']}",
        f"score       {threshold['score']}",
        "privacy     sample-level epsilon "
        + (
            f"{sample['epsilon']:.4g}: {sample['statement']}"
            if sample["epsilon"] is not None
            else sample["statement"]
        ),
        "            client-level epsilon "
        + (
            f"{client['epsilon']:.4g}: {client['statement']}"
            if client["epsilon"] is not None
            else client["statement"]
        ),
    ]
    lines += _robustness_lines(info["robustness"])
    run = info["training_run"]
    if run:
        lines.append(
            f"training    {run.get('scenario')}: {run.get('clients')} clients, {run.get('rounds')} rounds, "
            f"{run.get('strategy')}, best round {run.get('best_round')}"
        )
    drift = info["drift_reference"]
    lines.append(
        f"drift       reference of {drift['reference_scores']} calibration scores in {drift['bins']} bins"
        if drift
        else "drift       no reference (drift monitoring unavailable)"
    )
    exports = info["exports"]
    lines.append("exports     " + (", ".join(_export_text(k, v) for k, v in exports.items()) or "none"))
    lines.append("files")
    for name, entry in sorted(info["files"].items()):
        lines.append(f"  {entry['bytes']:>12,d}  {entry['sha256'][:16]}  {name}")
    return "\n".join(lines)


def _robustness_lines(section: dict[str, Any]) -> list[str]:
    if not section.get("enabled"):
        return [f"robustness  not evaluated{': ' + section['reason'] if section.get('reason') else ''}"]
    clean = section["clean"]
    lines = [
        f"robustness  clean on {section['rows']} test rows: ROC-AUC {clean['auc']:.3f}, detection rate "
        f"{clean['detection_rate']:.2f}, false-alarm rate {clean['false_alarm_rate']:.2f}"
    ]
    for label, worst in (("white box", section["white_box"]), ("scores only", section["scores_only"])):
        for key, row in sorted(worst.items()):
            metric = "detection_rate" if row["direction"] == "evade" else "false_alarm_rate"
            shown = (
                f"ROC-AUC {clean['auc']:.3f} -> {row['auc']:.3f}"
                if metric not in clean or row["direction"] == "two-sided"
                else (f"{metric.replace('_', ' ')} {clean[metric]:.2f} -> {row[metric]:.2f}")
            )
            lines.append(f"            {label}, {key}: {row['attack']} at {row['epsilon']:g}: {shown}")
    return lines


def _export_text(kind: str, record: dict[str, Any]) -> str:
    agreement = record.get("agreement_with_float_model")
    if agreement:
        return (
            f"{record['path']} (median relative score error {agreement['median_relative_error']:.1e}, "
            f"flags agree on {agreement['flag_agreement']:.1%})"
        )
    return f"{record['path']} (signature {record.get('signature')})"
