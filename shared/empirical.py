"""Empirical privacy audit: LOWER bounds on epsilon from attacks, held against the accountant's UPPER bound.

The accountant proves an upper bound for the algorithm as written; an attack measures what the code as
run actually leaks. A lower bound above the upper bound means the implementation does not deliver its
claim (a failed audit). A lower bound far below it proves nothing: attacks are weak, particularly
against a final model only, and these two are deliberately simple.

- Membership inference on the run's model (``membership_inference``): tensorflow-privacy's threshold
  attack on per-example reconstruction error, members being the clients' training rows and non-members
  their held-out rows (a random split of the same data). ROC-AUC, membership advantage, and an epsilon
  lower bound from tensorflow-privacy's ``EpsilonLowerBound``.
- One-run canary audit (``canary_audit``, Steinke, Nasr, Jagielski 2023): one local DP-SGD training
  with the run's own settings through the real ``LocalTrainer``, on a client's data plus canaries each
  included with probability 1/2; the auditor guesses membership from reconstruction errors and
  ``shared.one_run`` turns the number of correct guesses into a bound.

Every epsilon here is sample-level (add/remove one example), per client, at the run's delta.

This module and ``shared.training`` are the only ones that import tensorflow-privacy: training its DP-SGD
code, this one its ``privacy_tests`` (shipped separately, in tensorflow-empirical-privacy). Both import
them after ``shared.tfenv``'s switches.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.tfenv import configure_tensorflow, load_tensorflow

load_tensorflow()  # tensorflow-privacy's modules only after tfenv's switches

from tensorflow_privacy.privacy.privacy_tests import epsilon_lower_bound as elb
from tensorflow_privacy.privacy.privacy_tests.membership_inference_attack import (
    membership_inference_attack as mia,
)
from tensorflow_privacy.privacy.privacy_tests.membership_inference_attack.data_structures import (
    AttackInputData,
    AttackType,
    SlicingSpec,
)

from shared import privacy
from shared.audit import read_summary
from shared.config import FedaeConfig
from shared.data.errors import DataError
from shared.data.sources import data_spec, load_client_data
from shared.detector import Detector, load_bundle
from shared.ledger import dataset_fingerprint
from shared.models import ModelSpec, reconstruction_errors
from shared.one_run import one_run_ceiling, one_run_epsilon_lower_bound
from shared.task import train_settings
from shared.training import TrainSettings, get_trainer, sampling_plan

logger = logging.getLogger(f"fedae.{__name__}")

DEFAULT_CANARIES = 1000
DEFAULT_GUESSES = 100
DEFAULT_CONFIDENCE = 0.95  # the confidence Steinke et al. report their bounds at
# Canaries of tabular data, in standardised units: every feature +-4 standard deviations at once, far
# outside the data, so that a canary's reconstruction depends mostly on its own gradients; random signs
# keep canaries nearly orthogonal to each other. Image canaries are random black-and-white images.
TABULAR_CANARY_AMPLITUDE = 4.0


@dataclass(frozen=True)
class MembershipInference:
    """Threshold attack on reconstruction error: members should reconstruct better than non-members."""

    auc: float
    advantage: float  # tensorflow-privacy's: max over thresholds of |TPR - FPR| (either direction)
    epsilon_lower_bound: float
    confidence: float
    members: int
    non_members: int


def _check_losses(name: str, losses: np.ndarray) -> np.ndarray:
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 1 or len(losses) < 4:
        raise ValueError(f"{name} must be a 1-D array of at least 4 losses, got shape {losses.shape}")
    if not np.isfinite(losses).all():
        raise ValueError(f"{name} holds {int((~np.isfinite(losses)).sum())} non-finite losses")
    return losses


def membership_inference(
    loss_members: np.ndarray,
    loss_non_members: np.ndarray,
    *,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> MembershipInference:
    """Run tensorflow-privacy's threshold attack and bound epsilon from below at ``confidence``.

    The epsilon bound comes from ``EpsilonLowerBound`` (Clopper-Pearson intervals on TPR and FPR) at ONE
    threshold, chosen on a random half of the examples and evaluated on the other half: the maximum over
    every threshold of per-threshold 95% bounds, which ``run_attacks`` reports, is not a 95% bound.
    Like tensorflow-privacy's, the bound treats examples as independent trials and ignores delta
    (which would lower it by about delta / FPR): a screening figure, not a proof. ``seed`` only splits
    the examples.
    """
    members = _check_losses("loss_members", loss_members)
    non_members = _check_losses("loss_non_members", loss_non_members)
    if not 0.5 <= confidence < 1:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    with warnings.catch_warnings():
        # run_attacks also computes its own (all-threshold) bounds, whose formulas divide by zero at the
        # extreme thresholds; those figures are not used.
        warnings.simplefilter("ignore", RuntimeWarning)
        results = mia.run_attacks(
            AttackInputData(loss_train=members, loss_test=non_members),
            SlicingSpec(entire_dataset=True),
            attack_types=(AttackType.THRESHOLD_ATTACK,),
        )
    attack = results.single_attack_results[0]

    rng = np.random.default_rng(seed)
    select_members, test_members = np.array_split(rng.permutation(members), 2)
    select_non, test_non = np.array_split(rng.permutation(non_members), 2)
    # Two ratios are tested at the chosen threshold (TPR/FPR and TNR/FNR): Bonferroni halves alpha.
    alpha = (1.0 - confidence) / 2.0

    def bound(member_losses: np.ndarray, non_member_losses: np.ndarray, threshold: float) -> float:
        # EpsilonLowerBound predicts "positive" above a threshold: members have LOWER loss, so negate.
        values = elb.EpsilonLowerBound(
            -member_losses,
            -non_member_losses,
            alpha=alpha,
            two_sided_threshold=False,
            thresholds=np.array([threshold]),
        ).compute_epsilon_lower_bound(elb.BoundMethod.CLOPPER_PEARSON, k=1)
        return max(0.0, float(values[0])) if values.size else 0.0

    pooled = -np.concatenate([select_members, select_non])
    candidates = np.unique(np.quantile(pooled, np.linspace(0.01, 0.99, 99)))
    chosen = max(candidates, key=lambda t: bound(select_members, select_non, float(t)))
    return MembershipInference(
        auc=float(attack.get_auc()),
        advantage=float(attack.get_attacker_advantage()),
        epsilon_lower_bound=bound(test_members, test_non, float(chosen)),
        confidence=confidence,
        members=len(members),
        non_members=len(non_members),
    )


@dataclass(frozen=True)
class CanaryAudit:
    """One DP-SGD training with canaries, and the bound its outcome gives."""

    canaries: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    confidence: float
    ceiling: float  # the bound if every guess were right: the most this audit can ever show
    delta: float
    upper_bound: float | None  # the accountant's epsilon for this training (None without DP)
    accountant: str
    included: int  # canaries the coin flips put in
    examples: int  # training rows: the client's plus the included canaries
    batch_size: int
    sampling_probability: float
    steps: int
    epochs: int
    noise_multiplier: float
    l2_norm_clip: float
    seed: int


def make_canaries(count: int, spec: ModelSpec, rng: np.random.Generator) -> np.ndarray:
    """``count`` out-of-distribution examples in the model's (scaled) input layout."""
    if count < 1:
        raise ValueError(f"canary count must be >= 1, got {count}")
    shape = (count, *spec.input_shape)
    if spec.output_activation == "sigmoid":  # images scaled to [0, 1]
        return rng.integers(0, 2, size=shape).astype(np.float32)
    return (TABULAR_CANARY_AMPLITUDE * rng.choice(np.array([-1.0, 1.0]), size=shape)).astype(np.float32)


def canary_audit(
    spec: ModelSpec,
    settings: TrainSettings,
    x_train: np.ndarray,
    *,
    noise_multiplier: float,
    epochs: int,
    delta: float,
    sampling_probability: float | None = None,
    initial_weights: list[np.ndarray] | None = None,
    canaries: int = DEFAULT_CANARIES,
    guesses: int = DEFAULT_GUESSES,
    confidence: float = DEFAULT_CONFIDENCE,
    accountant: str = "rdp",
    seed: int | None = None,
) -> CanaryAudit:
    """Train once on ``x_train`` (scaled) plus canaries each included with probability 1/2, then guess.

    The auditor guesses "in" for the ``ceil(guesses / 2)`` canaries with the lowest reconstruction error
    and "out" for the ``floor(guesses / 2)`` with the highest, abstaining on the rest; the count and
    guess split are fixed before training, so the bound needs no correction for choosing them.
    ``sampling_probability`` (the run's q) sets the batch size to ``q * n`` for the ``n`` rows trained
    on, so q and the steps per epoch are the run's; without it ``settings.batch_size`` is kept.
    ``seed`` fixes the coin flips, canaries and DP noise (tests); by default they come from the OS.
    """
    if not 1 <= guesses <= canaries:
        raise ValueError(f"guesses must be in [1, canaries={canaries}], got {guesses}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    seed = secrets.randbits(63) if seed is None else seed
    rng = np.random.default_rng(seed)
    x_canary = make_canaries(canaries, spec, rng)
    included = rng.random(canaries) < 0.5
    x = np.concatenate([np.asarray(x_train, dtype=np.float32), x_canary[included]])
    batch_size = settings.batch_size
    if sampling_probability is not None:
        if not 0 < sampling_probability <= 1:
            raise ValueError(f"sampling_probability must be in (0, 1], got {sampling_probability}")
        batch_size = max(1, round(sampling_probability * len(x)))
    trainer = get_trainer(spec, dataclasses.replace(settings, batch_size=batch_size))
    # The trainer is shared within the process: start from known weights, never a previous fit's.
    trainer.set_weights(trainer.initial_weights if initial_weights is None else initial_weights)
    logger.info(
        "canary audit: %d canaries (%d included) + %d rows, batch %d, %d epochs",
        canaries,
        int(included.sum()),
        len(x_train),
        batch_size,
        epochs,
    )
    fit = trainer.fit(x, epochs=epochs, noise_multiplier=noise_multiplier, seed=int(rng.integers(2**62)))
    errors = reconstruction_errors(trainer.model, trainer.spec, x_canary)
    order = np.argsort(errors, kind="stable")
    guess_in, guess_out = order[: (guesses + 1) // 2], order[len(order) - guesses // 2 :]
    correct = int(included[guess_in].sum() + (~included[guess_out]).sum())
    upper = None
    if settings.dp and noise_multiplier > 0:  # noise 0: no finite upper bound to compare with
        event = privacy.TrainingEvent(
            1, noise_multiplier, fit.sampling_probability, fit.steps, len(x), fit.sampling, fit.epochs
        )
        upper = privacy.cumulative_epsilon([event], delta, accountant)
    return CanaryAudit(
        canaries=canaries,
        guesses=guesses,
        correct=correct,
        epsilon_lower_bound=one_run_epsilon_lower_bound(
            canaries, guesses, correct, delta=delta, confidence=confidence
        ),
        confidence=confidence,
        ceiling=one_run_ceiling(canaries, guesses, delta=delta, confidence=confidence),
        delta=delta,
        upper_bound=upper,
        accountant=accountant.upper(),
        included=int(included.sum()),
        examples=len(x),
        batch_size=batch_size,
        sampling_probability=fit.sampling_probability,
        steps=fit.steps,
        epochs=epochs,
        noise_multiplier=noise_multiplier,
        l2_norm_clip=settings.l2_norm_clip,
        seed=seed,
    )


def empirical_audit(
    run_dir: str | Path,
    ledger_audit: dict[str, Any],
    *,
    canaries: int = DEFAULT_CANARIES,
    guesses: int = DEFAULT_GUESSES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int | None = None,
) -> dict[str, Any]:
    """Both attacks on a run folder, next to the upper bounds ``ledger_audit`` (``audit_run``) recomputed.

    The embedded data sets are regenerated from ``summary.json``'s run config and checked against the
    fingerprints in the clients' ledgers, so members are exactly what each client trained on.
    """
    run_dir = Path(run_dir)
    config = FedaeConfig.from_run_config(read_summary(run_dir).get("run_config", {}))
    detector = load_run_bundle(run_dir)
    configure_tensorflow()
    delta, accountant = float(ledger_audit["delta"]), config.accountant
    seed = secrets.randbits(63) if seed is None else seed

    members, non_members, train_rows = [], [], {}
    for row in ledger_audit["clients"]:
        data = load_client_data(config, row["client"])
        if dataset_fingerprint(data.x_train)[:12] not in row["dataset_fingerprint"].split(","):
            raise DataError(
                f"client {row['client']}'s training data, regenerated from summary.json's run_config, is not "
                "what its ledger recorded; members and non-members cannot be told apart",
                path=str(run_dir),
            )
        x_train, x_holdout = (
            detector.scaler.transform(data.x_train),
            detector.scaler.transform(data.x_holdout),
        )
        train_rows[row["client"]] = x_train
        members.append(reconstruction_errors(detector.model, detector.spec, x_train))
        non_members.append(reconstruction_errors(detector.model, detector.spec, x_holdout))
    try:
        attack = membership_inference(
            np.concatenate(members), np.concatenate(non_members), confidence=confidence, seed=seed
        )
    except ValueError as err:  # too few held-out rows, or a model whose errors are not finite
        raise DataError(f"membership inference cannot run on this run ({err})", path=str(run_dir)) from err
    # Every member is protected by its own client's epsilon, at most the worst client's.
    mia_upper = float(ledger_audit["max_epsilon"])

    # The canary training copies the client with the largest epsilon: its sampling rate and its total
    # steps over every training in its ledger, starting from the run's final model.
    # (Among clients that trained: a ledger may hold only a threshold histogram release.)
    trained = [r for r in ledger_audit["clients"] if r["sigma"] is not None]
    if not trained:
        raise DataError("no client's ledger holds a DP-SGD training to copy", path=str(run_dir))
    worst = max(trained, key=lambda r: (r["epsilon"], -r["client"]))
    q = float(worst["sampling_probability"])
    batch = max(1, round(q * worst["examples"]))
    steps_per_epoch = sampling_plan(worst["examples"], batch, 1, config.sampling)[1]
    epochs = max(1, round(worst["steps"] / steps_per_epoch))
    canary = canary_audit(
        detector.spec,
        train_settings(config, data_spec(config)),
        train_rows[worst["client"]],
        noise_multiplier=float(worst["sigma"]),
        epochs=epochs,
        delta=delta,
        sampling_probability=q,
        initial_weights=detector.model.get_weights(),
        canaries=canaries,
        guesses=guesses,
        confidence=confidence,
        accountant=accountant,
        seed=seed,
    )
    mia_passed = attack.epsilon_lower_bound <= mia_upper
    canary_passed = canary.upper_bound is None or canary.epsilon_lower_bound <= canary.upper_bound
    return {
        "statement": (
            f"LOWER bounds from attacks, at {confidence:.0%} confidence, against the accountant's UPPER "
            f"bounds; every epsilon sample-level ({privacy.NEIGHBOURING[config.sampling]}), per client, "
            f"delta={delta:g}"
        ),
        "delta": delta,
        "confidence": confidence,
        "seed": seed,
        "membership_inference": {
            "bound": "lower (attack on the run's final model)",
            "auc": attack.auc,
            "advantage": attack.advantage,
            "epsilon_lower_bound": attack.epsilon_lower_bound,
            "confidence": confidence,
            "delta": delta,
            "upper_bound": mia_upper,
            "upper_bound_is": f"worst client's epsilon ({ledger_audit['accountant']} accountant, ledgers)",
            "members": attack.members,
            "non_members": attack.non_members,
            "passed": mia_passed,
        },
        "canary": {
            "bound": "lower (one-run canary audit, Steinke et al. 2023)",
            "client": worst["client"],
            **dataclasses.asdict(canary),
            "upper_bound_is": f"this training's epsilon ({canary.accountant} accountant)",
            "client_epsilon": worst["epsilon"],
            "passed": canary_passed,
        },
        "passed": mia_passed and canary_passed,
    }


def load_run_bundle(run_dir: Path) -> Detector:
    """The run's detector bundle, or a ``DataError`` naming what is missing."""
    folder = run_dir / "bundle"
    if not folder.is_dir():
        raise DataError(
            "no bundle/ folder: the empirical audit needs the run's trained model", path=str(run_dir)
        )
    try:
        return load_bundle(folder)
    except (ValueError, OSError) as err:
        raise DataError(f"cannot load the run's bundle ({err})", path=str(folder)) from err
