"""The bundle's serving exports (SavedModel, TFLite) and its .tar.gz form: same scores, checked files."""

import io
import json
import tarfile

import numpy as np
import pytest
from scipy import stats

from shared.detector import (
    Detector,
    export_bundle,
    load_bundle,
    pack_bundle,
    save_bundle,
    unpack_bundle,
    verify_bundle,
    write_manifest,
)
from shared.export import SIGNATURE, parse_exports, synthetic_rows, tflite_scores
from shared.models import ModelSpec, build_model, residuals, tf
from shared.preprocess import Scaler
from shared.scoring import ResidualScorer

# TFLite float16 stores weights in half precision (11-bit mantissa): scores computed through it agree
# with the float32 model to this relative tolerance on these small models (measured about 1e-3 at most).
FLOAT16_RTOL = 1e-2


def _detector(rng: np.random.Generator, kind: str, rule: str) -> tuple[Detector, np.ndarray]:
    """A small untrained detector with fitted scaler, scorer and a median threshold, and raw rows."""
    if kind == "dense":
        x = (rng.normal(size=(64, 12)) * 3 + 5).astype(np.float32)
        scaler = Scaler.fit(x, "tabular", None, flatten=True)
        spec = ModelSpec(kind, scaler.model_input_shape, 4, "linear")
    else:
        x = (rng.random((64, 8, 8, 1)) * 255).astype(np.float32)
        scaler = Scaler.fit(x, "image", (0.0, 255.0), flatten=kind != "conv")
        spec = ModelSpec(kind, scaler.model_input_shape, 4, "sigmoid")
    model = build_model(spec)
    scorer = ResidualScorer.fit(rule, residuals(model, spec, scaler.transform(x)))
    threshold = float(np.median(scorer.score(residuals(model, spec, scaler.transform(x)))))
    return Detector(model, spec, scaler, scorer, threshold, "percentile", {}), x


def _saved_model_scores(folder, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    serve = tf.saved_model.load(str(folder / "saved_model")).signatures[SIGNATURE]
    out = serve(x=tf.constant(x))
    return out["score"].numpy(), out["anomaly"].numpy()


@pytest.mark.parametrize(
    ("kind", "rule"), [("dense", "max-standardized"), ("conv", "standardized"), ("vae", "mse")]
)
def test_saved_model_scores_raw_rows_as_the_keras_detector_does(tmp_path, rng, kind: str, rule: str) -> None:
    detector, x = _detector(rng, kind, rule)
    folder = save_bundle(detector, tmp_path / "b", exports=("savedmodel",))
    scores, flags = _saved_model_scores(folder, x)
    expected = load_bundle(folder).score(x)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-7)
    clear = np.abs(expected - detector.threshold) > 1e-5 * detector.threshold  # not on the threshold itself
    np.testing.assert_array_equal(flags[clear], (expected[clear] > detector.threshold).astype(np.int32))
    assert flags.dtype == np.int32 and set(np.unique(flags)) == {0, 1}  # a median threshold splits them
    recorded = json.loads((folder / "metadata.json").read_text())["exports"]["savedmodel"]
    assert recorded["signature"] == SIGNATURE and recorded["input"]["x"][1] == [None, *x.shape[1:]]


def test_tflite_float16_agrees_within_tolerance_and_int8_keeps_the_ranking(tmp_path, rng) -> None:
    detector, x = _detector(rng, "dense", "standardized")
    folder = save_bundle(detector, tmp_path / "b", exports=("tflite-float16", "tflite-int8"))
    assert not (folder / "saved_model").exists()  # only an intermediate step: not asked for, not kept
    reference = detector.score(x)
    half, _ = tflite_scores(folder / "model_float16.tflite", x)
    np.testing.assert_allclose(half, reference, rtol=FLOAT16_RTOL)
    quantised, _ = tflite_scores(folder / "model_int8.tflite", x)
    assert not np.allclose(quantised, reference, rtol=1e-6)  # really quantised, not the float graph
    assert stats.spearmanr(quantised, reference).statistic > 0.9
    exports = json.loads((folder / "metadata.json").read_text())["exports"]
    assert "synthetic" in exports["tflite-int8"]["representative_data"]
    # The agreement the metadata records is what the file gives on the documented synthetic rows.
    recorded = exports["tflite-float16"]["agreement_with_float_model"]
    rows = synthetic_rows(detector, recorded["rows"], seed=1)
    again = tflite_scores(folder / "model_float16.tflite", rows)[0]
    relative = np.abs(again - detector.score(rows)) / np.abs(detector.score(rows))
    assert recorded["median_relative_error"] == pytest.approx(float(np.median(relative)))
    assert recorded["median_relative_error"] < FLOAT16_RTOL
    load_bundle(folder)  # every export file is listed and checked


def test_synthetic_representative_rows_follow_the_scaler_not_any_data(rng) -> None:
    detector, _ = _detector(rng, "dense", "mse")
    rows = synthetic_rows(detector, 4000, seed=0)
    z = detector.scaler.transform(rows)
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05  # standard normal in the scaled space
    image_detector, _ = _detector(rng, "conv", "mse")
    pixels = synthetic_rows(image_detector, 100, seed=0)
    assert pixels.min() >= 0 and pixels.max() <= 255 and pixels.shape[1:] == (8, 8, 1)


def test_every_export_file_is_checked_a_changed_variable_is_refused(tmp_path, rng) -> None:
    detector, _ = _detector(rng, "dense", "mse")
    folder = save_bundle(detector, tmp_path / "b", exports=("savedmodel",))
    listed = verify_bundle(folder)["files"]
    variables = [name for name in listed if name.startswith("saved_model/variables/")]
    assert "saved_model/saved_model.pb" in listed and variables
    target = folder / variables[0]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content
    target.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{variables[0]}: .*(differs|bytes)"):
        load_bundle(folder)


def test_a_symlink_inside_the_saved_model_is_refused(tmp_path, rng) -> None:
    detector, _ = _detector(rng, "dense", "mse")
    folder = save_bundle(detector, tmp_path / "b", exports=("savedmodel",))
    (tmp_path / "outside").write_text("x")
    (folder / "saved_model" / "assets").mkdir(exist_ok=True)
    (folder / "saved_model" / "assets" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(ValueError, match=r"saved_model/assets/link: not a plain file"):
        load_bundle(folder)


def test_re_export_without_tflite_removes_the_earlier_files(tmp_path, rng) -> None:
    detector, _ = _detector(rng, "dense", "mse")
    folder = save_bundle(detector, tmp_path / "b", exports=("savedmodel", "tflite-float16"))
    save_bundle(detector, folder, exports=())
    assert not (folder / "model_float16.tflite").exists() and not (folder / "saved_model").exists()
    assert json.loads((folder / "metadata.json").read_text())["exports"] == {}
    load_bundle(folder)


def test_archive_round_trip_scores_identically(tmp_path, rng) -> None:
    detector, x = _detector(rng, "dense", "max-standardized")
    folder = save_bundle(detector, tmp_path / "bundle", exports=("savedmodel",))
    archive = pack_bundle(folder)
    assert archive.name == "bundle.tar.gz" and not list(tmp_path.glob("*.partial"))
    loaded = load_bundle(archive)
    np.testing.assert_allclose(loaded.score(x), detector.score(x), rtol=1e-6)
    assert loaded.bundle_id == load_bundle(folder).bundle_id  # the same bundle, packed or not
    with tarfile.open(archive) as tar:
        assert all(m.isfile() for m in tar.getmembers())
        assert {m.name.split("/")[0] for m in tar.getmembers()} == {"bundle"}


def _rewrite_archive(source, target, change) -> None:
    with tarfile.open(source) as old, tarfile.open(target, "w:gz") as new:
        for member in old.getmembers():
            data = old.extractfile(member).read()
            member, data = change(member, data)
            if member is not None:
                member.size = len(data)
                new.addfile(member, io.BytesIO(data))


def test_a_tampered_or_unsafe_archive_is_refused(tmp_path, rng) -> None:
    detector, _ = _detector(rng, "dense", "mse")
    archive = pack_bundle(save_bundle(detector, tmp_path / "bundle"))

    def flip_threshold(member, data):
        if member.name.endswith("threshold.json"):
            data = data.replace(b'"threshold": ', b'"threshold": 1')
        return member, data

    _rewrite_archive(archive, tmp_path / "tampered.tar.gz", flip_threshold)
    with pytest.raises(ValueError, match=r"threshold\.json"):
        load_bundle(tmp_path / "tampered.tar.gz")

    def escape(member, data):
        member.name = member.name.replace("bundle/", "bundle/../../", 1)
        return member, data

    _rewrite_archive(archive, tmp_path / "escape.tar.gz", escape)
    into = tmp_path / "deep" / "er"
    into.mkdir(parents=True)
    with pytest.raises(ValueError, match=r"escape\.tar\.gz"):
        unpack_bundle(tmp_path / "escape.tar.gz", into)
    # bundle/../../x from deep/er would land in tmp_path: nothing may be written anywhere.
    assert not list(into.iterdir()) and not (tmp_path / "model.keras").exists()

    with tarfile.open(tmp_path / "link.tar.gz", "w:gz") as tar:
        link = tarfile.TarInfo("bundle/model.keras")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(ValueError, match=r"not plain files: bundle/model\.keras"):
        load_bundle(tmp_path / "link.tar.gz")
    (tmp_path / "junk.tar.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match=r"junk\.tar\.gz: not a readable bundle archive"):
        load_bundle(tmp_path / "junk.tar.gz")


def test_parse_exports_names_the_bad_value() -> None:
    assert parse_exports("tflite-int8, savedmodel") == ("savedmodel", "tflite-int8")
    assert parse_exports("none") == () and parse_exports("") == ()
    with pytest.raises(ValueError, match=r"'onnx'"):
        parse_exports("savedmodel,onnx")


def test_config_refuses_an_unknown_export() -> None:
    from shared.config import ConfigError, FedaeConfig

    assert FedaeConfig().bundle_exports == "savedmodel"
    with pytest.raises(ConfigError, match=r"bundle-exports: .*'tflite'"):
        FedaeConfig.from_run_config({"bundle-exports": "tflite"})


def test_a_model_config_naming_a_module_does_not_get_it_imported(tmp_path, rng, monkeypatch) -> None:
    """tf-keras' safe mode still imports any module a config names; fedae reads only the weights."""
    import sys
    import zipfile

    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "fedae_sentinel_module.py").write_text("IMPORTED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    detector, x = _detector(rng, "dense", "mse")
    folder = save_bundle(detector, tmp_path / "b")
    with zipfile.ZipFile(folder / "model.keras") as original:
        members = {name: original.read(name) for name in original.namelist()}
    config = json.loads(members["config.json"])
    config["module"] = "fedae_sentinel_module"
    members["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(folder / "model.keras", "w") as rewritten:
        for name, data in members.items():
            rewritten.writestr(name, data)
    # Whoever can rewrite a file can rewrite the manifest too: only the loading itself protects here.
    write_manifest(folder, ["model.keras", "preprocessing.json", "threshold.json", "metadata.json"])
    loaded = load_bundle(folder)
    assert "fedae_sentinel_module" not in sys.modules
    np.testing.assert_allclose(loaded.score(x), detector.score(x), rtol=1e-6)


def test_a_file_swapped_after_the_check_is_never_read(tmp_path, rng, monkeypatch) -> None:
    import shared.detector as bundles

    detector, x = _detector(rng, "dense", "mse")
    folder = save_bundle(detector, tmp_path / "b")
    other, _ = _detector(np.random.default_rng(99), "dense", "mse")
    save_bundle(other, tmp_path / "other")
    real_bundle_id = bundles.bundle_id

    def swap_then_id(path):  # runs after the check: the original's model is replaced now
        (folder / "model.keras").write_bytes((tmp_path / "other" / "model.keras").read_bytes())
        return real_bundle_id(path)

    monkeypatch.setattr(bundles, "bundle_id", swap_then_id)
    loaded = load_bundle(folder)
    np.testing.assert_allclose(loaded.score(x), detector.score(x), rtol=1e-6)  # the checked weights
    assert not np.allclose(other.score(x), detector.score(x))  # and the swap would have shown


def test_a_failed_export_leaves_the_bundle_as_it_was(tmp_path, rng, monkeypatch) -> None:
    import shared.detector as bundles

    detector, _ = _detector(rng, "dense", "mse")
    folder = save_bundle(detector, tmp_path / "b", exports=("savedmodel",))
    before = verify_bundle(folder)

    def broken(*_args, **_kwargs):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(bundles, "write_exports", broken)
    with pytest.raises(RuntimeError, match="converter crashed"):
        export_bundle(folder, ("tflite-float16",))
    assert verify_bundle(folder) == before  # same files, same manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging folder left behind
    monkeypatch.undo()
    export_bundle(folder, ("tflite-float16",))
    assert (folder / "model_float16.tflite").is_file() and not (folder / "saved_model").exists()
    assert verify_bundle(folder)["files"]["model.keras"] == before["files"]["model.keras"]  # not re-saved


def test_an_archive_is_checked_against_its_manifest_before_anything_is_written(tmp_path, rng) -> None:
    detector, _ = _detector(rng, "dense", "mse")
    archive = pack_bundle(save_bundle(detector, tmp_path / "bundle"))

    with tarfile.open(archive) as old, tarfile.open(tmp_path / "bomb.tar.gz", "w:gz") as new:
        for member in old.getmembers():
            new.addfile(member, old.extractfile(member))
        payload = tarfile.TarInfo("bundle/payload.bin")
        payload.size = 10 << 20
        new.addfile(payload, io.BytesIO(bytes(payload.size)))
    into = tmp_path / "into"
    into.mkdir()
    with pytest.raises(ValueError, match=r"payload\.bin: not in the manifest"):
        unpack_bundle(tmp_path / "bomb.tar.gz", into)
    assert not list(into.iterdir())


def test_pack_refuses_an_archive_inside_the_bundle(tmp_path, rng) -> None:
    detector, _ = _detector(rng, "dense", "mse")
    folder = save_bundle(detector, tmp_path / "b")
    with pytest.raises(ValueError, match=r"cannot go inside the bundle"):
        pack_bundle(folder, folder / "b.tar.gz")
    load_bundle(folder)
