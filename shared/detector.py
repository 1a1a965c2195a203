"""The anomaly detector: residual scores, thresholds, metrics, and the exported bundle.

A bundle is one folder that needs nothing else to score data: ``model.keras`` (Keras 2 format; only its
weights are read), ``preprocessing.json`` (the scaler), ``threshold.json`` (threshold and score rule with
its per-feature scales), ``metadata.json`` (input schema, model kind, privacy figures, robustness
headline, training run, exports), ``drift.json`` (the calibration scores' distribution), the serving
exports (``shared/export.py``), and ``manifest.json``: the SHA-256 and size of every other file, the
creation time and the fedae, TensorFlow, tf-keras and Flower versions that wrote it.

Loading copies the bundle into a private folder, checks every file of the copy against the manifest,
and reads only the copy: a changed, missing, unlisted or non-plain file is refused, and a file swapped
in the original after the check is never read. The model is built in code from the checked metadata
and only its weights come from ``model.keras``, so no config from the bundle is deserialised.

The checksums catch a corrupted copy and a file swapped in the bundle; someone who can rewrite the
manifest too is not stopped by them (that needs a signature, which a deployment can add around the
bundle).
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_score, recall_score, roc_auc_score

from shared.data.errors import BundleError
from shared.drift import DriftReference
from shared.export import EXPORT_ENTRIES, Representative, write_exports
from shared.preprocess import Scaler
from shared.scoring import ResidualScorer

BUNDLE_FORMAT = 2  # 2: manifest.json with checksums and versions
MANIFEST = "manifest.json"
BUNDLE_FILES = ("model.keras", "preprocessing.json", "threshold.json", "metadata.json", MANIFEST)
DRIFT_FILE = "drift.json"  # the calibration scores' distribution (shared.drift); absent in hand-made bundles
OPTIONAL_FILES = (DRIFT_FILE,)
_VERSIONED = ("fedae", "tensorflow", "tf-keras", "flwr")  # read from the installed distributions
_HEX64 = re.compile(r"[0-9a-f]{64}")


def fit_threshold(errors: np.ndarray, rule: str, percentile: float = 95.0, k: float = 3.0) -> float:
    """Threshold on normal reconstruction errors: a percentile, or mean + k standard deviations."""
    errors = np.asarray(errors, dtype=np.float64)
    if errors.size == 0 or not np.isfinite(errors).all():
        raise ValueError("threshold needs a non-empty set of finite reconstruction errors")
    if rule == "percentile":
        if not 0 < percentile < 100:
            raise ValueError(f"percentile must be in (0, 100), got {percentile}")
        return float(np.percentile(errors, percentile))
    if rule == "mean-k-sigma":
        return float(errors.mean() + k * errors.std())
    raise ValueError(f"threshold rule must be 'percentile' or 'mean-k-sigma', got {rule!r}")


def describe_rule(rule: str, percentile: float, k: float) -> str:
    """The rule in words; a federated run states its release in full (``ThresholdRelease.sentence``)."""
    if rule == "federated-percentile":
        return f"{percentile:g}th percentile of the clients' own training scores, from DP histograms"
    if rule == "percentile":
        return f"{percentile:g}th percentile of normal calibration scores"
    return f"mean + {k:g} sigma of normal calibration scores"


def detection_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """ROC-AUC and average precision of the scores, precision and recall of ``score > threshold``."""
    labels = np.asarray(labels)
    predicted = (np.asarray(scores) > threshold).astype(int)
    both = len(np.unique(labels)) == 2
    return {
        "test_auc": float(roc_auc_score(labels, scores)) if both else float("nan"),
        "test_average_precision": float(average_precision_score(labels, scores)) if both else float("nan"),
        "threshold": float(threshold),
        "precision": float(precision_score(labels, predicted, zero_division=0)),
        "recall": float(recall_score(labels, predicted, zero_division=0)),
        "false_alarm_rate": float(predicted[labels == 0].mean()) if (labels == 0).any() else float("nan"),
    }


@dataclass
class Detector:
    """A trained autoencoder with its scaler and threshold: raw rows in, scores and flags out."""

    model: Any  # tf.keras.Model
    spec: Any  # shared.models.ModelSpec
    scaler: Scaler
    scorer: ResidualScorer
    threshold: float
    threshold_rule: str
    metadata: dict[str, Any]
    drift_reference: DriftReference | None = None  # calibration scores, for drift monitoring
    # "sha256:" + the manifest's digest (first 16 hex digits): names the exact bundle a score came from,
    # since the manifest covers every file; empty for a detector that was never saved.
    bundle_id: str = ""

    def score(self, x_raw: np.ndarray) -> np.ndarray:
        from shared.models import residuals

        return self.scorer.score(residuals(self.model, self.spec, self.scaler.transform(x_raw)))

    def predict(self, x_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores = self.score(x_raw)
        return scores, (scores > self.threshold).astype(np.int64)


def save_bundle(
    detector: Detector,
    folder: str | Path,
    exports: tuple[str, ...] = (),
    representative: Representative | None = None,
) -> Path:
    """Write the bundle into ``folder`` (new, or holding only an earlier bundle's files, which it
    replaces); anything else there is refused rather than overwritten or vouched for.

    ``exports``: serving exports to add (``shared.export.EXPORT_KINDS``: a SavedModel, TFLite files);
    ``representative``: the int8 export's calibration rows (``shared.export.Representative``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ours = BUNDLE_FILES + OPTIONAL_FILES + EXPORT_ENTRIES
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in ours)
    if foreign:
        raise BundleError(f"{folder}: refusing to write a bundle beside other files: {', '.join(foreign)}")
    detector.model.save(folder / "model.keras")
    (folder / "preprocessing.json").write_text(json.dumps(detector.scaler.to_dict()))
    (folder / "threshold.json").write_text(
        json.dumps(
            {
                "threshold": detector.threshold,
                "rule": detector.threshold_rule,
                "score": detector.scorer.describe(),
                "scorer": detector.scorer.to_dict(),
                "anomaly_if": "score > threshold",
            },
            indent=2,
        )
    )
    spec = detector.spec
    metadata = {
        "format": BUNDLE_FORMAT,
        "model": {
            "kind": spec.kind,
            "input_shape": list(spec.input_shape),
            "latent_dim": spec.latent_dim,
            "output_activation": spec.output_activation,
            "activation": spec.activation,
        },
        **detector.metadata,
        "exports": write_exports(detector, folder, exports, representative),
    }
    (folder / "metadata.json").write_text(json.dumps(metadata, indent=2, default=_json_default))
    drift = folder / DRIFT_FILE
    if detector.drift_reference is not None:
        drift.write_text(json.dumps(detector.drift_reference.to_dict()))
    elif drift.exists():  # an earlier bundle's reference would describe another model's scores
        drift.unlink()
    _write_manifest_for_all(folder)  # last: it vouches for the rest
    return folder


def _write_manifest_for_all(folder: Path) -> None:
    """The manifest of every plain file in ``folder`` (the exports' nested files included)."""
    files, odd = _walk(folder)
    if odd:  # nothing the bundle writer made: refuse rather than leave it out of the manifest
        raise BundleError(f"{folder}: entries that are not plain files: {', '.join(odd)}")
    write_manifest(folder, [name for name in files if name != MANIFEST])


def _walk(folder: Path) -> tuple[dict[str, Path], list[str]]:
    """Every plain file under ``folder`` by its bundle-relative name, and the entries that are not plain
    files or folders (symlinks anywhere, devices, sockets): walked without following links."""
    files: dict[str, Path] = {}
    odd: list[str] = []
    for root, dirs, names in os.walk(folder, followlinks=False):
        base = Path(root)
        for name in sorted(dirs):
            if (base / name).is_symlink():
                odd.append((base / name).relative_to(folder).as_posix())
        for name in sorted(names):
            path = base / name
            relative = path.relative_to(folder).as_posix()
            if path.is_symlink() or not path.is_file():
                odd.append(relative)
            else:
                files[relative] = path
    return files, odd


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def write_manifest(folder: str | Path, names: list[str]) -> dict[str, Any]:
    """Write ``manifest.json`` for the files ``names`` in ``folder``: each one's SHA-256 and size, the
    creation time (UTC) and the versions of the software that wrote the bundle."""
    folder = Path(folder)
    manifest = {
        "format": BUNDLE_FORMAT,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {name: _version(name) for name in _VERSIONED},
        "files": {
            name: {"sha256": _sha256(folder / name), "bytes": (folder / name).stat().st_size}
            for name in sorted(names)
        },
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BundleError(f"{path}: not a readable {what} ({err})") from err
    if not isinstance(value, dict):
        raise BundleError(f"{path}: not a readable {what} (a JSON {type(value).__name__}, not an object)")
    return value


def _entry_problem(name: str, entry: Any, path: Path) -> str | None:
    if (
        not isinstance(entry, dict)
        or not isinstance(entry.get("sha256"), str)
        or not _HEX64.fullmatch(entry["sha256"])
        or not isinstance(entry.get("bytes"), int)
    ):
        return f"{name}: malformed manifest entry {entry!r}"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{name}: {size} bytes, the manifest says {entry['bytes']}"
    if _sha256(path) != entry["sha256"]:
        return f"{name}: content differs from its SHA-256 in the manifest"
    return None


def verify_bundle(folder: str | Path, shown: str | Path | None = None) -> dict[str, Any]:
    """The bundle's manifest, once every entry of the folder matches it; ValueError naming each one that
    does not (changed, missing, not listed, not a plain file, or a malformed manifest entry).

    Names in the manifest are never turned into paths: only the folder's own entries are read, so a
    manifest cannot point the check at a file outside the bundle. ``shown``: the name messages use."""
    folder = Path(folder)
    label = Path(shown) if shown is not None else folder  # what messages call it (a checked copy's origin)
    if (folder / MANIFEST).is_symlink():  # a link could make the manifest vouch from outside the bundle
        raise BundleError(f"{label / MANIFEST}: not a plain file (a symbolic link), refusing the bundle")
    manifest = _read_json_object(folder / MANIFEST, "bundle manifest")
    listed = manifest.get("files")
    if not isinstance(listed, dict) or not listed:
        raise BundleError(f"{label / MANIFEST}: not a readable bundle manifest ('files' lists nothing)")
    present, odd = _walk(folder)
    present.pop(MANIFEST, None)
    problems = [f"{name}: not a plain file" for name in odd]
    problems += [
        f"{name}: listed but missing" for name in sorted(listed) if name not in present and name not in odd
    ]
    for name, path in sorted(present.items()):
        if name not in listed:
            problems.append(f"{name}: not in the manifest")
        elif problem := _entry_problem(name, listed[name], path):
            problems.append(problem)
    if problems:
        raise BundleError(
            f"{label}: refusing a bundle that does not match its manifest: " + "; ".join(problems)
        )
    return manifest


def bundle_id(folder: str | Path) -> str:
    """``sha256:`` and the manifest's first 16 hex digits: the manifest covers every file, so this names
    the exact bundle (the service's ``model_version``)."""
    return "sha256:" + _sha256(Path(folder) / MANIFEST)[:16]


ARCHIVE_SUFFIX = ".tar.gz"


def is_archive(path: str | Path) -> bool:
    return str(path).endswith(ARCHIVE_SUFFIX)


MAX_ARCHIVE_BYTES = 4 << 30  # what an archive may unpack to: a bundle is megabytes, a bomb is not


def pack_bundle(folder: str | Path, archive: str | Path | None = None) -> Path:
    """The checked bundle ``folder`` as one ``.tar.gz`` (default: beside it, ``<folder>.tar.gz``) holding
    the folder under its own name; written to a temporary name first, so a failure leaves no archive."""
    folder = Path(folder)
    archive = Path(archive) if archive is not None else folder.with_name(folder.name + ARCHIVE_SUFFIX)
    if not is_archive(archive):
        raise BundleError(f"a bundle archive's name must end in {ARCHIVE_SUFFIX}, got {archive}")
    if archive.resolve().is_relative_to(folder.resolve()):
        raise BundleError(f"{archive}: the archive cannot go inside the bundle it packs ({folder})")
    partial = archive.with_name(archive.name + ".partial")
    with tempfile.TemporaryDirectory(prefix="fedae-pack-") as scratch:
        # Packed from a checked private copy: an archive of a tampered bundle would carry it on.
        checked = checked_copy(folder, Path(scratch))
        files, _ = _walk(checked)
        try:
            with tarfile.open(partial, "w:gz") as tar:
                for name in sorted(files):  # files only, in a fixed order: no links, owners are not kept
                    info = tar.gettarinfo(files[name], arcname=f"{folder.name}/{name}")
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    with files[name].open("rb") as handle:
                        tar.addfile(info, handle)
            partial.replace(archive)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return archive


def unpack_bundle(archive: Path, into: Path) -> Path:
    """Extract a bundle archive into ``into``; its folder. Nothing is written until the archive's own
    manifest is read and every member is a plain file (or folder) it lists, of the size it says."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            odd = [m.name for m in members if not (m.isfile() or m.isdir())]
            if odd:
                raise BundleError(f"{archive}: holds entries that are not plain files: {', '.join(odd[:5])}")
            tops = {m.name.split("/", 1)[0] for m in members}
            if len(tops) != 1:
                raise BundleError(f"{archive}: a bundle archive holds one folder, found {sorted(tops)}")
            top = tops.pop()
            listed = _archive_manifest(tar, archive, top)
            problems, total = [], 0
            for member in members:
                if not member.isfile():
                    continue
                name = member.name.removeprefix(f"{top}/")
                entry = listed.get(name)
                if name == MANIFEST:
                    continue
                if not isinstance(entry, dict):
                    problems.append(f"{name}: not in the manifest")
                elif member.size != entry.get("bytes"):
                    problems.append(f"{name}: {member.size} bytes, the manifest says {entry.get('bytes')}")
                total += member.size
            if problems:
                raise BundleError(
                    f"{archive}: refusing an archive that does not match its manifest: "
                    + "; ".join(problems[:10])
                )
            if total > MAX_ARCHIVE_BYTES:
                raise BundleError(
                    f"{archive}: would unpack to {total:,d} bytes (the limit is {MAX_ARCHIVE_BYTES:,d})"
                )
            # The "data" filter refuses absolute names, ".." and links out of ``into``.
            tar.extractall(into, filter="data")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise BundleError(f"{archive}: not a readable bundle archive ({err})") from err
    return into / top


def _archive_manifest(tar: tarfile.TarFile, archive: Path, top: str) -> dict[str, Any]:
    member = next((m for m in tar.getmembers() if m.name == f"{top}/{MANIFEST}" and m.isfile()), None)
    if member is None or member.size > 1 << 20:
        raise BundleError(f"{archive}: no readable {MANIFEST} in {top}/: the archive cannot be checked")
    handle = tar.extractfile(member)
    try:
        listed = json.loads(handle.read() if handle else b"").get("files")
    except (ValueError, AttributeError) as err:
        raise BundleError(f"{archive}: {top}/{MANIFEST} is not a readable bundle manifest ({err})") from err
    if not isinstance(listed, dict):
        raise BundleError(f"{archive}: {top}/{MANIFEST} is not a readable bundle manifest (no 'files')")
    return listed


def checked_copy(path: str | Path, scratch: Path) -> Path:
    """A private copy of the bundle (folder or ``.tar.gz``) under ``scratch``, checked against its
    manifest. Everything read afterwards comes from this copy, so what is used is exactly what was
    checked: a file swapped in the original after the check is never read."""
    path = Path(path)
    if not (path.is_dir() or (is_archive(path) and path.is_file())):
        raise BundleError(f"{path}: no such bundle folder or .tar.gz")
    if is_archive(path):
        folder = unpack_bundle(path, scratch)
    else:
        files, odd = _walk(path)
        if odd:  # the copy would silently leave them out: refuse as the check would
            raise BundleError(
                f"{path}: refusing a bundle that does not match its manifest: "
                + "; ".join(f"{name}: not a plain file" for name in odd)
            )
        folder = scratch / "bundle"
        for name, source in files.items():
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target, follow_symlinks=False)
    _check_format(folder, path)
    verify_bundle(folder, shown=path)
    return folder


def _check_format(folder: Path, shown: Path) -> None:
    missing = [n for n in BUNDLE_FILES if not (folder / n).is_file()]
    if missing and missing != [MANIFEST]:
        raise BundleError(f"{shown} is not a fedae bundle: missing {', '.join(missing)}")
    # The format before the checksums: a bundle from another fedae version is told so, not called
    # tampered. With a manifest, its own format field says it (metadata.json is read only once checked).
    if missing:
        found = _read_json_object(folder / "metadata.json", "bundle metadata file").get("format")
    else:
        found = _read_json_object(folder / MANIFEST, "bundle manifest").get("format")
    if found != BUNDLE_FORMAT:
        raise BundleError(
            f"{shown}: bundle format {found!r} is not supported (this fedae reads format {BUNDLE_FORMAT}; "
            "export the run's bundle again with it)"
        )
    if missing:
        raise BundleError(f"{shown}: missing {MANIFEST}: the bundle's files cannot be checked, refusing it")


def load_bundle(path: str | Path) -> Detector:
    """Load a bundle folder or ``.tar.gz`` archive from a checked private copy (``checked_copy``).

    The model is built in code from the checked metadata (``shared.models.build_model``) and only its
    weights are read from ``model.keras``: no model config from the bundle is deserialised, so a bundle
    cannot make Keras import or call anything (tf-keras' safe mode still imports any module a config
    names)."""
    with tempfile.TemporaryDirectory(prefix="fedae-bundle-") as scratch:
        return _load_checked(checked_copy(path, Path(scratch)))


def _load_checked(folder: Path) -> Detector:
    from shared.models import ModelSpec, build_model

    identity = bundle_id(folder)
    metadata = _read_json_object(folder / "metadata.json", "bundle metadata file")
    threshold = _read_json_object(folder / "threshold.json", "bundle threshold file")
    try:
        m = metadata["model"]
        spec = ModelSpec(
            str(m["kind"]),
            tuple(int(v) for v in m["input_shape"]),
            int(m["latent_dim"]),
            str(m["output_activation"]),
            str(m.get("activation", "relu")),
        )
        model = build_model(spec)
        # Weights only (see load_bundle); a shape that does not fit the built model is refused.
        model.load_weights(str(folder / "model.keras"))
        scaler = Scaler.from_dict(_read_json_object(folder / "preprocessing.json", "bundle scaler file"))
        scorer = ResidualScorer.from_dict(threshold["scorer"])
        value, rule = float(threshold["threshold"]), str(threshold["rule"])
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{folder.name}: the bundle's files do not describe a detector ({err!r})") from err
    drift = None
    if (folder / DRIFT_FILE).is_file():  # checked: a drift.json present is listed in the manifest
        try:
            drift = DriftReference.from_dict(_read_json_object(folder / DRIFT_FILE, "drift reference"))
        except ValueError as err:
            raise BundleError(f"{DRIFT_FILE}: {err}") from err
    return Detector(model, spec, scaler, scorer, value, rule, metadata, drift, identity)


def export_bundle(
    folder: str | Path,
    kinds: tuple[str, ...],
    representative: Callable[[Detector], Representative | None] | None = None,
) -> Path:
    """Replace the bundle's serving exports with ``kinds``, all or nothing.

    The new bundle is built from a checked copy in a staging folder beside ``folder`` (same file system)
    and swapped in by two renames, so a failure (a converter error, Ctrl-C, a full disk) leaves the old
    bundle as it was. Only the exports, ``metadata.json`` (its ``exports``) and the manifest change; the
    model and the other files are the checked bytes. ``representative`` gets the checked detector (its
    schema) and returns the int8 export's calibration rows (None: synthetic ones)."""
    folder = Path(folder)
    if is_archive(folder):
        raise BundleError(f"{folder}: exports are added to a bundle folder; unpack the archive first")
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.export-") as staging:
        checked = checked_copy(folder, Path(staging))
        detector = _load_checked(checked)
        metadata = _read_json_object(checked / "metadata.json", "bundle metadata file")
        rows = representative(detector) if representative is not None else None
        metadata["exports"] = write_exports(detector, checked, kinds, rows)
        (checked / "metadata.json").write_text(json.dumps(metadata, indent=2, default=_json_default))
        _write_manifest_for_all(checked)
        old = Path(staging) / "old"
        folder.rename(old)
        try:
            checked.rename(folder)
        except BaseException:
            old.rename(folder)  # put the original back before the staging folder is removed
            raise
    return folder


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
