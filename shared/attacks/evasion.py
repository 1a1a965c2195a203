"""Test-time (evasion) attacks on the aggregated detector: its real score, threshold and input range.

What is attacked is the detector as deployed: the model's input (the scaler's output), the autoencoder's
deterministic reconstruction, the anomaly-score rule with its per-feature calibration scales
(``shared.scoring``), and the threshold. Two directions: anomalies pushed under the threshold (missed
detections, ``evade``) and normal rows pushed over it (false alarms, ``false-alarm``).

- White box: FGSM and PGD under an L-infinity or L2 budget in the model's input space, PGD with a random
  start; gradients of the score itself (not of a surrogate loss).
- Black box, score only: SPSA (simultaneous-perturbation gradient estimates from score queries) under an
  L-infinity budget and a query budget, for a deployed detector whose weights an attacker does not have.
- Baseline: a random perturbation of the same size, to show how much of the damage is the attack's.

Every perturbed row stays within its budget and within the valid input range (``low``/``high``: the pixel
range for images; for sensor tables, the range the coordinator's calibration data spans, since no
physical bounds ship with a table).

Why written here: ART's Keras estimators and attacks (like CleverHans' and Foolbox's) target classifiers
(logits, class labels) or plain regressors; none takes a reconstruction-error score with per-feature
standardisation and a threshold as the objective, and none covers both attack directions of a detector.
The attacks are short in TensorFlow once the score is a differentiable function.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from shared.models import residuals
from shared.scoring import ResidualScorer
from shared.tfenv import load_tensorflow

tf = load_tensorflow()

NORMS = ("linf", "l2")
DIRECTIONS = ("evade", "false-alarm")  # anomalies scored under the threshold / normal rows over it


@dataclass(frozen=True)
class Target:
    """The detector as an attacker sees it, in the model's input space."""

    model: object  # tf.keras.Model
    spec: object  # shared.models.ModelSpec
    scorer: ResidualScorer
    threshold: float
    low: np.ndarray  # valid input range, broadcastable to one row of the model's input
    high: np.ndarray

    def score(self, x: np.ndarray) -> np.ndarray:
        """The detector's own score of each row (float64): what it reports and decides by, bit for bit.
        The attacks differentiate the same function (``score_tensor``), compiled."""
        return self.scorer.score(residuals(self.model, self.spec, x)) if len(x) else np.zeros(0)

    def score_and_gradient(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's score and its gradient with respect to the row, from one forward and backward
        pass: PGD needs both at every iterate, and a second forward pass for the score alone cost a
        third of its time."""
        score, gradient = self._compiled_score_and_gradient(tf.convert_to_tensor(x))
        return score.numpy().astype(np.float64), gradient.numpy()

    # Compiled once per target (cached on the instance): eager TensorFlow spends more time dispatching
    # than computing for these small models, and PGD makes thousands of calls (measured: 0.94 s eager,
    # 0.08 s compiled for 40 steps on 300 rows). The compiled graph fuses each layer's matmul, bias and
    # activation, which rounds float32 slightly differently (1e-5 relative): the attack follows this
    # score, while every figure reported comes from ``score``. reduce_retracing: the batch dimension is
    # left unknown after the first shapes, so a short last batch does not trace again.
    @functools.cached_property
    def _compiled_score_and_gradient(self) -> Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
        def score_and_gradient(x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            with tf.GradientTape() as tape:
                tape.watch(x)
                score = self.score_tensor(x)
                total = tf.reduce_sum(score)  # rows are independent: the sum's gradient is per row
            return score, tape.gradient(total, x)

        return tf.function(score_and_gradient, reduce_retracing=True)

    def score_tensor(self, x: tf.Tensor) -> tf.Tensor:
        """Differentiable score: the scoring rule applied to ``x - reconstruction(x)``."""
        spec = self.spec
        if spec.kind == "vae":  # the deterministic reconstruction: decode the posterior mean
            eps = tf.zeros((tf.shape(x)[0], spec.latent_dim))
            reconstruction = self.model([x, eps], training=False)[:, : spec.input_shape[0]]
        else:
            reconstruction = self.model(x, training=False)
        residual = tf.reshape(x - reconstruction, (tf.shape(x)[0], -1))
        squared = tf.square(tf.cast(residual, tf.float64))  # as shared.scoring squares: in float64
        if self.scorer.rule == "mse":
            return tf.reduce_mean(squared, axis=1)
        standardized = squared / tf.constant(self.scorer.scale, tf.float64)
        if self.scorer.rule == "max-standardized":
            return tf.reduce_max(standardized, axis=1)
        return tf.reduce_mean(standardized, axis=1)


def _sign(direction: str) -> float:
    """+1: the attacker raises the score (false alarms); -1: lowers it (missed detections)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return 1.0 if direction == "false-alarm" else -1.0


def _check(norm: str, epsilon: float) -> None:
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if not (epsilon >= 0 and np.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon}")


def _per_row_norm(delta: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum(np.square(delta.reshape(len(delta), -1), dtype=np.float64), axis=1))


def project(target: Target, x: np.ndarray, x_adv: np.ndarray, norm: str, epsilon: float) -> np.ndarray:
    """Back into the budget around ``x`` (L-infinity box or L2 ball), then into the valid range, widened to
    hold ``x`` itself (a test row may lie outside the calibration span: the attack never pulls it in).
    Clipping never leaves the ball: each coordinate only moves towards ``x``."""
    delta = x_adv - x
    if norm == "linf":
        delta = np.clip(delta, -epsilon, epsilon)
    else:
        norms = _per_row_norm(delta)
        factor = np.minimum(1.0, epsilon / np.maximum(norms, 1e-12)).reshape(-1, *([1] * (x.ndim - 1)))
        delta = delta * factor
    low, high = np.minimum(target.low, x), np.maximum(target.high, x)
    return np.clip(x + delta, low, high).astype(np.float32)


def _gradient(target: Target, x: np.ndarray) -> np.ndarray:
    return target.score_and_gradient(x)[1]


def _keep_best(
    sign: float, x: np.ndarray, score: np.ndarray, best: np.ndarray, best_score: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, ``x`` where its score beats the best so far in the attack's direction."""
    better = sign * score > sign * best_score
    return np.where(better.reshape(-1, *([1] * (x.ndim - 1))), x, best), np.where(better, score, best_score)


def _step(gradient: np.ndarray, norm: str, size: float) -> np.ndarray:
    """The steepest step of ``size`` under the norm: the sign for L-infinity, the unit direction for L2."""
    if norm == "linf":
        return size * np.sign(gradient)
    norms = _per_row_norm(gradient).reshape(-1, *([1] * (gradient.ndim - 1)))
    return size * gradient / np.maximum(norms, 1e-12)


def fgsm(target: Target, x: np.ndarray, epsilon: float, norm: str, direction: str) -> np.ndarray:
    """One gradient step of the whole budget (the fast gradient (sign) method)."""
    _check(norm, epsilon)
    sign = _sign(direction)
    if epsilon == 0:
        return x.copy()
    return project(target, x, x + sign * _step(_gradient(target, x), norm, epsilon), norm, epsilon)


def pgd(
    target: Target,
    x: np.ndarray,
    epsilon: float,
    norm: str,
    direction: str,
    steps: int = 40,
    restarts: int = 2,
    seed: int = 0,
) -> np.ndarray:
    """Projected gradient descent on the score, the best point per row over ``restarts`` runs.

    The first run starts at ``x`` itself, the others at a random point of the budget. Step sizes fall from
    the whole budget to 5 % of it (a cosine schedule, as in Croce and Hein's APGD): the first step from
    ``x`` is exactly FGSM's, the later ones refine it, so a maximum-over-features score, on which a
    fixed small step stalls in the first corner it reaches, is searched beyond FGSM's corner. Each row
    keeps the best point it reached: the last iterate on a non-convex score is not always the best.
    """
    _check(norm, epsilon)
    sign = _sign(direction)
    if epsilon == 0:
        return x.copy()
    rng = np.random.default_rng(seed)
    best, best_score = x.copy(), target.score(x)
    sizes = epsilon * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * np.arange(steps) / max(steps - 1, 1))))
    for restart in range(restarts):
        current = x if restart == 0 else random_perturbation(target, x, epsilon, norm, rng)
        for size in sizes:
            # Each iterate is scored by the pass that gives its gradient; the last one after the loop.
            score, gradient = target.score_and_gradient(current)
            best, best_score = _keep_best(sign, current, score, best, best_score)
            current = project(target, x, current + sign * _step(gradient, norm, size), norm, epsilon)
        best, best_score = _keep_best(sign, current, target.score(current), best, best_score)
    return best


def random_perturbation(
    target: Target, x: np.ndarray, epsilon: float, norm: str, rng: np.random.Generator | int = 0
) -> np.ndarray:
    """A uniformly random point of the budget (L-infinity box; L2: a random direction at full radius,
    then clipped to the valid range), the baseline an attack must beat."""
    _check(norm, epsilon)
    if epsilon == 0:
        return x.copy()
    rng = np.random.default_rng(rng)
    if norm == "linf":
        delta = rng.uniform(-epsilon, epsilon, size=x.shape)
    else:
        direction = rng.normal(size=x.shape)
        delta = _step(direction, "l2", epsilon)
    return project(target, x, x + delta.astype(np.float32), norm, epsilon)


def spsa(
    target: Target,
    x: np.ndarray,
    epsilon: float,
    direction: str,
    query_budget: int = 2000,
    samples: int = 16,
    probe: float = 0.01,
    seed: int = 0,
) -> tuple[np.ndarray, int]:
    """Score-only attack under an L-infinity budget: SPSA gradient estimates (``samples`` random sign
    probes of size ``probe`` per step, two score queries each) and signed steps, until each row has used
    ``query_budget`` queries. Returns the perturbed rows and the queries used per row."""
    _check("linf", epsilon)
    sign = _sign(direction)
    if epsilon == 0:
        return x.copy(), 0
    if query_budget < 2 * samples + 2:
        raise ValueError(
            f"a query budget of {query_budget} cannot pay for one SPSA step ({2 * samples + 2} queries)"
        )
    rng = np.random.default_rng(seed)
    step_size = epsilon / 10
    current, best = x.copy(), x.copy()
    best_score = target.score(x)
    used = 1  # the clean score
    while used + 2 * samples + 1 <= query_budget:
        flips = rng.choice(np.array([-1.0, 1.0], np.float32), size=(samples, *current.shape))
        # Probes stay in the valid range too: a deployed detector is only asked about valid inputs. All
        # of a step's probes go to the detector as one batch (the queries counted are the same).
        probes = [project(target, x, current + probe * f, "linf", epsilon + probe) for f in flips]
        probes += [project(target, x, current - probe * f, "linf", epsilon + probe) for f in flips]
        scores = target.score(np.concatenate(probes)).reshape(2, samples, len(x))
        slopes = (scores[0] - scores[1]) / (2 * probe)  # (samples, rows)
        estimate = np.sum(slopes.reshape(samples, len(x), *([1] * (x.ndim - 1))) * flips, axis=0)
        used += 2 * samples
        current = project(target, x, current + sign * step_size * np.sign(estimate), "linf", epsilon)
        used += 1
        best, best_score = _keep_best(sign, current, target.score(current), best, best_score)
    return best, used


Attack = Callable[[Target, np.ndarray, float, str, str], np.ndarray]


def input_range(kind: str, x_reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The valid input range in the model's input space: [0, 1] for images (the scaler maps the pixel
    range there); for tables, each feature's range over ``x_reference`` (the coordinator's calibration
    rows, already scaled), since a table ships no physical bounds."""
    if kind == "image":
        return np.zeros(x_reference.shape[1:], np.float32), np.ones(x_reference.shape[1:], np.float32)
    return x_reference.min(axis=0).astype(np.float32), x_reference.max(axis=0).astype(np.float32)


def attack_rows(
    target: Target,
    x: np.ndarray,
    attack: str,
    norm: str,
    epsilon: float,
    direction: str,
    seed: int = 0,
    **options: int,
) -> tuple[np.ndarray, int]:
    """``x`` perturbed by ``attack`` ("fgsm", "pgd", "random", "spsa"); also the score queries used
    (0 for the white-box attacks, which read gradients instead)."""
    if attack == "fgsm":
        return fgsm(target, x, epsilon, norm, direction), 0
    if attack == "pgd":
        return pgd(target, x, epsilon, norm, direction, seed=seed, **options), 0
    if attack == "random":
        return random_perturbation(target, x, epsilon, norm, seed), 0
    if attack == "spsa":
        if norm != "linf":
            raise ValueError("spsa runs under an L-infinity budget only")
        return spsa(target, x, epsilon, direction, seed=seed, **options)
    raise ValueError(f"attack must be fgsm, pgd, random or spsa, got {attack!r}")


def attacked_scores(
    target: Target,
    x: np.ndarray,
    y: np.ndarray,
    attack: str,
    norm: str,
    epsilon: float,
    direction: str,
    seed: int = 0,
    **options: int,
) -> tuple[np.ndarray, int]:
    """The detector's scores after ``attack`` perturbed the rows the direction targets (anomalies to
    evade, normal rows for false alarms; the others stay clean), and the score queries used per row."""
    targeted = np.asarray(y) == (1 if direction == "evade" else 0)
    perturbed = x.copy()
    queries = 0
    if targeted.any():
        perturbed[targeted], queries = attack_rows(
            target, x[targeted], attack, norm, epsilon, direction, seed, **options
        )
    return target.score(perturbed), int(queries)


def score_metrics(
    y: np.ndarray, scores: np.ndarray, clean_scores: np.ndarray, threshold: float, attacked: np.ndarray
) -> dict[str, float]:
    """ROC-AUC, detection rate (recall on anomalies at the threshold), false-alarm rate, and the success
    rate: of the ``attacked`` rows the clean detector got right, the fraction it now gets wrong."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y)
    flagged, clean_flagged = scores > threshold, clean_scores > threshold
    right_before = attacked & (clean_flagged == (y == 1))
    wrong_now = flagged != (y == 1)
    return {
        "auc": float(roc_auc_score(y, scores)),
        "detection_rate": float(flagged[y == 1].mean()),
        "false_alarm_rate": float(flagged[y == 0].mean()),
        "success_rate": float(wrong_now[right_before].mean()) if right_before.any() else 0.0,
    }


def evasion_metrics(
    target: Target,
    x: np.ndarray,
    y: np.ndarray,
    attack: str,
    norm: str,
    epsilon: float,
    direction: str,
    seed: int = 0,
    clean_scores: np.ndarray | None = None,
    **options: int,
) -> dict[str, object]:
    """Attack the rows the direction targets (anomalies to evade, normal rows for false alarms), leave the
    others clean, and measure the detector on the whole set (``score_metrics``)."""
    return evasion_row(target, x, y, attack, norm, epsilon, direction, seed, clean_scores, **options)[0]


def evasion_row(
    target: Target,
    x: np.ndarray,
    y: np.ndarray,
    attack: str,
    norm: str,
    epsilon: float,
    direction: str,
    seed: int = 0,
    clean_scores: np.ndarray | None = None,
    **options: int,
) -> tuple[dict[str, object], np.ndarray]:
    """``evasion_metrics``' row and the attacked scores it was computed from."""
    y = np.asarray(y)
    clean_scores = target.score(x) if clean_scores is None else clean_scores
    _sign(direction)  # refuse an unknown direction before attacking anything
    scores, queries = attacked_scores(target, x, y, attack, norm, epsilon, direction, seed, **options)
    targeted = y == (1 if direction == "evade" else 0)
    row: dict[str, object] = {
        "attack": attack,
        "norm": norm,
        "epsilon": float(epsilon),
        "direction": direction,
    }
    row.update(score_metrics(y, scores, clean_scores, target.threshold, targeted))
    row.update({"queries": queries, "rows_attacked": int(targeted.sum())})
    return row, scores
