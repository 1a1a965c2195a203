"""Synthetic multi-site battery-pack telemetry: the default ``fleet`` scenario.

Each site operates vehicles with a 96-cell series pack. One row is a telemetry snapshot of 207 channels:

- 96 cell voltages: open-circuit voltage of the shared state of charge, minus the shared pack current
  times each cell's internal resistance (cells differ by manufacturing spread, resistance rises in the
  cold), plus 2 mV sensor noise. Series cells share one current, so the voltages are strongly correlated.
- 96 cell temperatures: first-order lag of ambient temperature plus Joule heating (I^2 R), with cells in
  the middle of the pack running warmer than those at the ends; 0.1 C sensor noise.
- 8 module voltages (12 cells each), pack current, pack voltage, state of charge, vehicle speed, ambient
  temperature, coolant inlet and outlet temperature.

Sites differ (non-IID): climate (ambient mean and swing), usage (current per unit of speed, charging
share), and pack age (resistance). Faults are injected into held-out test vehicles only, never into
training data: cell degradation (one cell's resistance x2.5-5, so it sags under load and runs
warmer), stuck sensor (a cell-voltage channel frozen at an earlier reading), thermal-runaway onset (one
cell heating exponentially, neighbours following, voltage sagging) and spikes (a few channels jump by
several volts or degrees for one sample).
Rows are labelled 1 where the fault changes a reading by more than ten sensor-noise standard
deviations. Everything is deterministic for a given seed and site.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.signal import lfilter

NUM_CELLS = 96
CELLS_PER_MODULE = 12
NUM_MODULES = NUM_CELLS // CELLS_PER_MODULE
SNAPSHOT_EVERY = 5  # simulated seconds between rows kept, so consecutive rows are not near copies
VEHICLE_STEPS = 3000  # simulated seconds per vehicle, for training, calibration and test vehicles alike
FAULT_KINDS = ("cell-degradation", "stuck-sensor", "thermal-runaway", "spike")


def feature_names() -> list[str]:
    names = [f"cell_v_{i:02d}" for i in range(NUM_CELLS)]
    names += [f"cell_t_{i:02d}" for i in range(NUM_CELLS)]
    names += [f"module_v_{m}" for m in range(NUM_MODULES)]
    names += ["pack_current", "pack_voltage", "soc", "speed", "ambient_t", "coolant_in_t", "coolant_out_t"]
    return names


@dataclass(frozen=True)
class SiteProfile:
    """How one site differs from the others."""

    ambient_mean: float  # deg C
    ambient_swing: float
    amps_per_kmh: float
    charge_share: float  # fraction of time charging
    resistance_scale: float  # pack age


_ARCHETYPES = [
    SiteProfile(4.0, 9.0, 1.4, 0.15, 1.00),  # cool, heavy use
    SiteProfile(12.0, 8.0, 1.2, 0.25, 1.08),  # temperate
    SiteProfile(22.0, 8.0, 1.0, 0.20, 1.15),  # warm, older packs
    SiteProfile(16.0, 10.0, 1.3, 0.30, 1.04),  # urban delivery
    SiteProfile(8.0, 7.0, 0.9, 0.35, 1.10),  # light use
]
NUM_ARCHETYPES = len(_ARCHETYPES)  # site k is archetype k mod 5, shifted 1.5 C warmer per cycle


def site_profile(site: int) -> SiteProfile:
    """Site ``k``'s climate, usage and age; sites cycle through five archetypes with a small offset."""
    base = _ARCHETYPES[site % NUM_ARCHETYPES]
    shift = (site // NUM_ARCHETYPES) * 1.5
    return SiteProfile(
        base.ambient_mean + shift,
        base.ambient_swing,
        base.amps_per_kmh,
        base.charge_share,
        base.resistance_scale,
    )


def _ocv(soc: np.ndarray) -> np.ndarray:
    """Open-circuit voltage of an NMC cell as a smooth function of state of charge (0..1)."""
    return 3.0 + 1.15 * soc - 0.35 * np.exp(-12.0 * soc) + 0.05 * np.sin(3.0 * soc)


def _smooth_noise(rng: np.random.Generator, steps: int, pole: float, scale: float) -> np.ndarray:
    return lfilter([1.0 - pole], [1.0, -pole], rng.normal(0.0, scale, steps))


def simulate_vehicle(
    rng: np.random.Generator, profile: SiteProfile, steps: int, fault: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate one vehicle for ``steps`` seconds; return snapshot rows and their 0/1 fault labels."""
    t = np.arange(steps, dtype=float)
    # Drive cycle: smooth random speed, with charging periods during which the vehicle stands.
    speed = np.clip(55.0 + _smooth_noise(rng, steps, 0.995, 12.0) * 8.0, 0.0, 130.0)
    charging = _smooth_noise(rng, steps, 0.999, 1.0) > np.quantile(
        _smooth_noise(np.random.default_rng(rng.integers(1 << 31)), 4000, 0.999, 1.0),
        1.0 - profile.charge_share,
    )
    accel = np.gradient(speed)
    speed = np.where(charging, 0.0, speed)
    current = profile.amps_per_kmh * speed + 60.0 * accel + rng.normal(0.0, 3.0, steps)
    current = np.clip(current, -150.0, 350.0)
    current = np.where(charging, -80.0, current)  # constant-current charging (negative = into the pack)
    capacity_as = 60.0 * 3600.0  # 60 Ah
    soc = np.clip(0.75 - np.cumsum(current) / capacity_as + 0.1 * np.sin(t / 5000.0), 0.05, 0.98)

    ambient = profile.ambient_mean + profile.ambient_swing * np.sin(
        2 * np.pi * t / 20000.0 + rng.uniform(0, 6.3)
    )
    resistance = 0.0015 * profile.resistance_scale * (1.0 + 0.04 * rng.standard_normal(NUM_CELLS))
    position_heat = 1.0 + 0.3 * np.sin(np.pi * (np.arange(NUM_CELLS) + 0.5) / NUM_CELLS)

    fault_cell = int(rng.integers(NUM_CELLS))
    onset = int(steps * rng.uniform(0.3, 0.6))
    # A row is labelled anomalous where the fault visibly changes a reading: more than 10 sensor-noise
    # standard deviations (20 mV, 1 C). A degraded cell at rest or the first seconds of a thermal
    # runaway change nothing measurable, and no detector could flag them.
    active = np.zeros(steps, dtype=bool)
    r_cells = np.tile(resistance, (steps, 1))
    if fault == "cell-degradation":
        r_cells[onset:, fault_cell] *= rng.uniform(2.5, 5.0)

    # Cold cells have higher resistance; use the ambient temperature as the driver (cells track it).
    r_cells = r_cells * np.exp(0.02 * (25.0 - ambient))[:, None]
    ocv = _ocv(soc)
    cell_v = ocv[:, None] - current[:, None] * r_cells
    if fault == "cell-degradation":
        sag = np.abs(current * (r_cells[:, fault_cell] - r_cells[:, (fault_cell + 1) % NUM_CELLS]))
        active = (t >= onset) & (sag > 0.02)
    heat = (current[:, None] ** 2) * r_cells * position_heat[None, :]
    # Temperature lags load: first-order filter of (ambient + heat gain) with a ~5 minute time constant.
    target_t = ambient[:, None] + 0.5 * heat
    alpha = 1.0 / 300.0
    cell_t = lfilter([alpha], [1.0, alpha - 1.0], target_t - target_t[0], axis=0) + target_t[0]

    if fault == "thermal-runaway":
        rise = np.zeros(steps)
        # Exponential self-heating, capped at +80 C (the cell vents; the sensor saturates).
        rise[onset:] = np.minimum(np.expm1((t[onset:] - onset) / (steps * 0.05)) * 1.5, 80.0)
        neighbours = [c for c in (fault_cell - 1, fault_cell + 1) if 0 <= c < NUM_CELLS]
        cell_t[:, fault_cell] += rise
        cell_t[:, neighbours] += 0.35 * rise[:, None]
        cell_v[:, fault_cell] -= 0.004 * rise
        active = rise > 1.0

    cell_v = cell_v + rng.normal(0.0, 0.002, cell_v.shape)
    cell_t = cell_t + rng.normal(0.0, 0.1, cell_t.shape)
    module_v = cell_v.reshape(steps, NUM_MODULES, CELLS_PER_MODULE).sum(axis=2) + rng.normal(
        0, 0.01, (steps, NUM_MODULES)
    )
    pack_v = cell_v.sum(axis=1) + rng.normal(0.0, 0.05, steps)
    coolant_in = ambient + 0.2 * (cell_t.mean(axis=1) - ambient) + rng.normal(0, 0.1, steps)
    coolant_out = coolant_in + 0.5 * (cell_t.mean(axis=1) - coolant_in) + rng.normal(0, 0.1, steps)
    rows = np.column_stack(
        [cell_v, cell_t, module_v, current, pack_v, soc, speed, ambient, coolant_in, coolant_out]
    )

    if fault == "stuck-sensor":
        channel = int(rng.integers(NUM_CELLS))  # a cell voltage sensor freezes at an earlier reading
        frozen = rows[onset - int(rng.integers(500, 3000)), channel]
        active = (t >= onset) & (np.abs(rows[:, channel] - frozen) > 0.02)
        rows[onset:, channel] = frozen
    if fault == "spike":
        # Spikes are single-sample events: only the samples that carry one are anomalous.
        spike_times = rng.choice(np.arange(onset, steps), size=max(1, (steps - onset) // 40), replace=False)
        for time in spike_times:
            channels = rng.choice(rows.shape[1] - 7, size=int(rng.integers(1, 4)), replace=False)
            magnitude = np.where(channels < NUM_CELLS, rng.uniform(0.15, 0.6), rng.uniform(4.0, 15.0))
            rows[time, channels] += magnitude * rng.choice([-1.0, 1.0], size=channels.size)
            active[time] = True

    keep = np.arange(rng.integers(SNAPSHOT_EVERY), steps, SNAPSHOT_EVERY)
    if fault == "spike":
        keep = np.union1d(keep, np.flatnonzero(active))
    return rows[keep].astype(np.float32), active[keep].astype(np.int64)


def _rng(seed: int, site: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, site, purpose])


def normal_rows(seed: int, site: int, num_rows: int, purpose: int = 0) -> np.ndarray:
    """``num_rows`` fault-free snapshots from vehicles of ``site``; ``purpose`` separates disjoint draws."""
    rng = _rng(seed, site, purpose)
    profile = site_profile(site)
    # Rows are drawn at random from at least four vehicles and twice the rows needed, so even a small
    # draw (the coordinator's calibration set) spans several vehicles, charge levels and times of day
    # rather than one vehicle's first minutes.
    chunks, total = [], 0
    while total < 2 * num_rows or len(chunks) < 4:
        rows, _ = simulate_vehicle(rng, profile, steps=VEHICLE_STEPS)
        chunks.append(rows)
        total += len(rows)
    pool = np.concatenate(chunks)
    return pool[np.sort(rng.choice(len(pool), size=num_rows, replace=False))]


def test_rows(seed: int, sites: list[int], vehicles_per_site: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Labelled test telemetry: normal and faulty vehicles from every site; label 1 where a fault shows."""
    xs, ys = [], []
    for site in sites:
        rng = _rng(seed, site, 99)
        profile = site_profile(site)
        for vehicle in range(vehicles_per_site):
            fault = FAULT_KINDS[(vehicle // 2) % len(FAULT_KINDS)] if vehicle % 2 == 0 else None
            rows, labels = simulate_vehicle(rng, profile, steps=VEHICLE_STEPS, fault=fault)
            xs.append(rows)
            ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)
