"""Training-time attacks by malicious clients, for simulations: which clients attack, what they send.

Every attack here is a client that follows the protocol (it is sampled, trains, is charged, replies in
time with arrays of the right shapes and dtypes) and lies only in what it sends:

- ``sign-flip``: its update reversed, ``-s * delta`` (``s`` = attack-scale; 1 is the plain flip);
- ``scale``: its update boosted, ``s * delta``: model replacement (Bagdasaryan et al. 2020) when ``s`` is
  about the number of clients;
- ``noise``: Gaussian noise in place of an update, ``N(0, attack-noise-std^2)`` per weight;
- ``backdoor``: it trains on its own rows with half of them replaced by trigger-stamped anomalies of the
  kind it wants to slip through, so the model learns to reconstruct (and so not to flag) them when they
  carry the trigger; the update is boosted by ``s``, as a backdoor needs to survive averaging. In a
  simulation the attacker's anomalies are half of the test set's (``attacker_anomalies``), and the
  backdoor is measured on the other half (``measured_anomalies``);
- ``alie``: "A Little Is Enough" (Baruch et al. 2019): the colluding clients send the same update,
  ``mean - z * std`` per coordinate of their own honest updates, small enough to pass distance- and
  median-based rules yet pulling every coordinate the same way. It needs the colluders' updates
  together, so it is applied where their replies meet (``simulations/adversary.py``).

``delta`` is always the trained weights minus the global model the client was sent. Plain numpy and no
Flower, like the rest of ``shared``; the trigger and the synthetic anomalies live in the model's input
space (after the coordinator's scaler), where the client trains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from shared.updates import apply_deltas as _apply
from shared.updates import deltas as _deltas

ATTACKS = ("none", "sign-flip", "scale", "noise", "backdoor", "alie")
# Attacks a single client carries out alone, on its own update (client side); alie needs the colluders'
# updates together.
CLIENT_SIDE = ("sign-flip", "scale", "noise", "backdoor")
POISONED_ROW_FRACTION = 0.5  # of a backdoor client's training rows, replaced by triggered anomalies
TRIGGER_FEATURE_FRACTION = 0.05  # tables: the trigger sets this share of the features (at least one)
TRIGGER_TABLE_VALUE = 4.0  # tables: the trigger's value, in the scaler's z-scores (raw mean + 4 std)


def malicious_clients(num_clients: int, fraction: float, seed: int) -> frozenset[int]:
    """The ids of the ``round(fraction * num_clients)`` malicious clients (at least one when fraction >
    0): a seeded choice, so the server side and every client compute the same set."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    # Half rounds up (not Python's round-half-to-even): 30 % of 15 clients is 5, not 4.
    count = 0 if fraction == 0 else max(1, math.floor(fraction * num_clients + 0.5))
    order = np.random.default_rng([seed, 0xBAD]).permutation(num_clients)
    return frozenset(int(c) for c in order[:count])


def poison_update(
    attack: str,
    sent: Sequence[np.ndarray],
    trained: Sequence[np.ndarray],
    scale: float,
    noise_std: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """What a malicious client running ``attack`` (one of ``CLIENT_SIDE``) sends instead of ``trained``."""
    deltas = _deltas(sent, trained)
    if attack == "sign-flip":
        deltas = [-scale * d for d in deltas]
    elif attack in ("scale", "backdoor"):
        deltas = [scale * d for d in deltas]
    elif attack == "noise":
        deltas = [rng.normal(0.0, noise_std, size=d.shape) for d in deltas]
    else:
        raise ValueError(f"attack must be one of {CLIENT_SIDE}, got {attack!r}")
    return _apply(sent, deltas)


def alie_z(num_sampled: int, num_malicious: int) -> float:
    """Baruch et al.'s z_max: the largest shift (in standard deviations) that still leaves the colluders
    closer to the mean than enough honest clients for a majority-based rule to pick them."""
    from scipy.stats import norm

    supporters = math.floor(num_sampled / 2 + 1) - num_malicious
    if num_malicious < 1 or supporters < 1:
        raise ValueError(
            f"z_max is defined for a colluding minority: {num_malicious} malicious of {num_sampled} sampled"
        )
    return float(norm.ppf((num_sampled - supporters) / num_sampled))


def alie_update(
    sent: Sequence[np.ndarray], honest: Sequence[Sequence[np.ndarray]], z: float
) -> list[np.ndarray]:
    """The one model every colluder sends: ``mean - z * std`` of the colluders' own honest updates,
    coordinate by coordinate (their estimate of the honest clients' distribution)."""
    if len(honest) < 2:
        raise ValueError(
            f"alie needs at least two colluders' updates to estimate a spread, got {len(honest)}"
        )
    per_client = [_deltas(sent, trained) for trained in honest]
    deltas = []
    for layer in zip(*per_client, strict=True):
        stacked = np.stack(layer)
        deltas.append(stacked.mean(axis=0) - z * stacked.std(axis=0))
    return _apply(sent, deltas)


@dataclass(frozen=True)
class Trigger:
    """A backdoor trigger in the model's input space: ``mask`` marks the entries it sets to ``value``."""

    mask: np.ndarray  # bool, one row's shape (the model's input shape)
    value: float

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """``x`` (rows) with the trigger set."""
        stamped = np.array(x, dtype=np.float32, copy=True)
        stamped[:, self.mask] = self.value
        return stamped


def make_trigger(
    kind: str, image_shape: Sequence[int], model_input_shape: Sequence[int], seed: int
) -> Trigger:
    """The run's trigger: for images a bright square (side an eighth of the height, at least 2 pixels)
    in the bottom-right corner; for tables a seeded 5 % of the features (at least one) set to 4 standard
    deviations above the calibration mean, a plausible but unusual reading."""
    if kind == "image":
        mask = np.zeros(tuple(image_shape), dtype=bool)
        side = max(2, round(image_shape[0] / 8))
        mask[-side:, -side:, ...] = True
        return Trigger(mask.reshape(tuple(model_input_shape)), 1.0)
    width = int(np.prod(model_input_shape))
    count = max(1, math.ceil(TRIGGER_FEATURE_FRACTION * width))
    chosen = np.random.default_rng([seed, 0x7216]).choice(width, size=count, replace=False)
    mask = np.zeros(width, dtype=bool)
    mask[chosen] = True
    return Trigger(mask.reshape(tuple(model_input_shape)), TRIGGER_TABLE_VALUE)


def attacker_anomalies(x_test: np.ndarray, y_test: np.ndarray) -> np.ndarray:
    """The anomalies a simulated backdoor attacker holds: every other anomalous test row (the kind of
    fault or fraud it means to hide). The other half measures the backdoor."""
    return x_test[y_test == 1][0::2]


def measured_anomalies(x_test: np.ndarray, y_test: np.ndarray) -> np.ndarray:
    """The anomalous test rows the attacker never saw, on which the backdoor's success is measured."""
    return x_test[y_test == 1][1::2]


def backdoor_rows(
    x: np.ndarray, anomalies: np.ndarray, trigger: Trigger, rng: np.random.Generator
) -> np.ndarray:
    """A backdoor client's training rows: its own (scaled) rows with ``POISONED_ROW_FRACTION`` of them
    replaced by the attacker's ``anomalies`` (scaled, drawn with replacement) carrying the trigger."""
    if len(anomalies) == 0:
        raise ValueError("a backdoor attacker needs anomalies to hide; the test data has none")
    x = np.array(x, dtype=np.float32, copy=True)
    count = round(POISONED_ROW_FRACTION * len(x))
    rows = rng.choice(len(x), size=count, replace=False)
    x[rows] = trigger.stamp(anomalies[rng.integers(0, len(anomalies), size=count)])
    return x


def backdoor_success_rate(scores: np.ndarray, threshold: float) -> float:
    """Of the triggered anomalies' ``scores``, the fraction under the threshold (missed)."""
    if len(scores) == 0:
        raise ValueError("no anomalies to measure the backdoor on")
    return float(np.mean(np.asarray(scores) <= threshold))
