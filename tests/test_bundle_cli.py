"""`fedae bundle inspect|pack|export`: real bundles on disk, the real command, its output and exit codes."""

import json

import numpy as np
import pandas as pd
import pytest

from fedae.cli import main
from shared.detector import Detector, load_bundle, save_bundle
from shared.drift import DriftReference
from shared.models import ModelSpec, build_model
from shared.preprocess import Scaler
from shared.scoring import ResidualScorer

NAMES = [f"sensor_{i}" for i in range(6)]
PRIVACY = {
    "dp": True,
    "delta": 1e-5,
    "accountant": "RDP",
    "statement": "sample-level (add/remove one example), per client, cumulative over all rounds, "
    "delta=1e-05, RDP accountant, Poisson sampling",
    "sample_level": {"max_epsilon": 2.5},
    "client_level": {
        "enabled": True,
        "epsilon": 7.25,
        "delta": 1e-3,
        "accountant": "RDP (Flower)",
        "statement": "client-level (add/remove one client), whole federation",
    },
    "not_covered": "scalar metrics",
}
ROBUSTNESS = {
    "enabled": True,
    "rows": 40,
    "anomalous_rows": 20,
    "space": "model input",
    "clean": {"auc": 0.97, "detection_rate": 0.9, "false_alarm_rate": 0.1},
    "white_box": {
        "evade linf": {
            "attack": "pgd",
            "norm": "linf",
            "epsilon": 0.1,
            "direction": "evade",
            "auc": 0.8,
            "detection_rate": 0.55,
            "false_alarm_rate": 0.1,
            "success_rate": 0.4,
        }
    },
    "scores_only": {},
}


@pytest.fixture()
def bundle(tmp_path, rng):
    x = rng.normal(size=(50, len(NAMES))).astype(np.float32)
    scaler = Scaler.fit(x, "tabular", None, flatten=True)
    spec = ModelSpec("dense", scaler.model_input_shape, 2, "linear")
    metadata = {
        "input_schema": {"kind": "tabular", "shape": [len(NAMES)], "feature_names": NAMES},
        "threshold_rule": "95th percentile of normal calibration scores",
        "privacy": PRIVACY,
        "robustness": ROBUSTNESS,
        "training_run": {
            "scenario": "fleet",
            "rounds": 3,
            "clients": 2,
            "strategy": "fedavg",
            "best_round": 3,
        },
    }
    reference = DriftReference.from_scores(rng.gamma(2.0, size=300))
    detector = Detector(
        build_model(spec), spec, scaler, ResidualScorer("mse", None), 1.5, "percentile", metadata, reference
    )
    return save_bundle(detector, tmp_path / "bundle")


def test_inspect_prints_privacy_with_its_terms_robustness_and_files(bundle, capsys) -> None:
    assert main(["bundle", "inspect", str(bundle)]) == 0
    out = capsys.readouterr().out
    assert "checksums verified" in out and load_bundle(bundle).bundle_id in out
    assert "sample-level epsilon 2.5: worst client's sample-level (add/remove one example)" in out
    assert "delta=1e-05, RDP accountant" in out
    assert "client-level epsilon 7.25: client-level (add/remove one client)" in out
    assert "white box, evade linf: pgd at 0.1: detection rate 0.90 -> 0.55" in out
    assert "6 features" in out and "reference of 300 calibration scores" in out
    for name in ("model.keras", "threshold.json", "drift.json", "metadata.json"):
        assert name in out


def test_inspect_json_matches_the_files(bundle, capsys) -> None:
    assert main(["bundle", "inspect", str(bundle), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert info["files"] == manifest["files"] and info["verified"] is True
    assert info["threshold"]["value"] == 1.5 and info["input_schema"]["feature_names"] == NAMES
    assert info["privacy"]["sample_level"]["epsilon"] == 2.5
    assert info["privacy"]["sample_level"]["delta"] == 1e-5
    assert info["privacy"]["client_level"]["epsilon"] == 7.25
    assert info["drift_reference"]["reference_scores"] == 300


def test_inspect_refuses_a_tampered_bundle_with_exit_2(bundle, capsys) -> None:
    threshold = json.loads((bundle / "threshold.json").read_text())
    threshold["threshold"] = 1e9
    (bundle / "threshold.json").write_text(json.dumps(threshold))
    assert main(["bundle", "inspect", str(bundle)]) == 2
    err = capsys.readouterr().err
    assert "threshold.json" in err and "Traceback" not in err


def test_pack_then_inspect_the_archive(bundle, capsys) -> None:
    assert main(["bundle", "pack", str(bundle)]) == 0
    archive = capsys.readouterr().out.strip()
    assert archive.endswith("bundle.tar.gz")
    assert main(["bundle", "inspect", archive, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bundle_id"] == load_bundle(bundle).bundle_id


def test_export_adds_files_the_manifest_then_covers(bundle, tmp_path, rng, capsys) -> None:
    rows = pd.DataFrame(rng.normal(size=(60, len(NAMES))), columns=NAMES[::-1])  # order by name
    rows.to_csv(tmp_path / "public.csv", index=False)
    assert (
        main(
            [
                "bundle",
                "export",
                str(bundle),
                "--formats",
                "tflite-int8",
                "--representative",
                str(tmp_path / "public.csv"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    record = json.loads((bundle / "metadata.json").read_text())["exports"]["tflite-int8"]
    assert (
        record["representative_data"].startswith("30 rows of")
        and "public.csv" in record["representative_data"]
    )
    assert record["agreement_with_float_model"]["rows"] == 30  # the other half: not the calibration rows
    assert "model_int8.tflite" in json.loads((bundle / "manifest.json").read_text())["files"]
    load_bundle(bundle)


def test_export_with_bad_input_exits_2_naming_it(bundle, tmp_path, capsys) -> None:
    assert main(["bundle", "export", str(bundle), "--formats", "onnx"]) == 2
    assert "'onnx'" in capsys.readouterr().err
    pd.DataFrame({"sensor_0": [1.0, 2.0]}).to_csv(tmp_path / "short.csv", index=False)
    code = main(
        [
            "bundle",
            "export",
            str(bundle),
            "--formats",
            "tflite-int8",
            "--representative",
            str(tmp_path / "short.csv"),
        ]
    )
    assert code == 2
    assert "missing column(s)" in capsys.readouterr().err
    assert not (bundle / "model_int8.tflite").exists()
