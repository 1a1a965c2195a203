"""Split a pool of examples among simulated clients: IID, or Dirichlet non-IID over groups."""

from __future__ import annotations

import numpy as np


def iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffle and deal examples into ``num_clients`` near-equal parts."""
    if num_clients < 1 or num_clients > num_examples:
        raise ValueError(f"cannot split {num_examples} examples among {num_clients} clients")
    return [np.sort(part) for part in np.array_split(rng.permutation(num_examples), num_clients)]


def dirichlet(
    groups: np.ndarray,
    num_clients: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Non-IID split: each group's examples go to clients in Dirichlet(alpha) proportions.

    Small ``alpha`` gives each client a few dominant groups (sites or classes); large ``alpha`` tends
    to IID. Resamples until every client has at least ``min_size`` examples.
    """
    if alpha <= 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    labels = np.unique(groups)
    if len(labels) < 2:
        raise ValueError(
            f"a Dirichlet split needs at least two groups (sites or classes); this data has {len(labels)}"
        )
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for label in labels:
            members = rng.permutation(np.flatnonzero(groups == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split gave every one of {num_clients} clients "
        f"{min_size}+ examples in {max_tries} tries; raise alpha or lower the client count"
    )
