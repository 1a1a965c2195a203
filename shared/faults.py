"""Faults a test can ask a process to show through the environment: a crash at a named point, or the
model a broken or malicious client would send. Durability tests and the server's update checks use them;
nothing sets the variable in normal use.
"""

from __future__ import annotations

import logging
import os

import numpy as np

logger = logging.getLogger("fedae")

FAULT_ENV = "FEDAE_FAULT_INJECT"


def injected_fault(who: int) -> str:
    """The fault the environment asks for: ``NAME`` for everyone, ``NAME@N`` for client N alone (or, for
    the server's faults, round N alone); "" for none."""
    name, _, only = os.environ.get(FAULT_ENV, "").partition("@")
    return name if not only or only == str(who) else ""


def fault_point(name: str, who: int) -> None:
    """Die here, as a crash would, when the environment asks (``who``: the client id, or the server's
    round)."""
    if injected_fault(who) == name:
        logger.error("fault injected at %r: exiting without a reply", name)
        os._exit(70)


def faulty_weights(weights: list[np.ndarray], client_id: int) -> list[np.ndarray]:
    """The weights a broken or malicious client would send, when the environment asks for one."""
    fault = injected_fault(client_id)
    if fault == "nan-weights":
        weights = [w.copy() for w in weights]
        weights[0].flat[0] = np.nan
    elif fault == "wrong-shape":
        weights = [*weights[:-1], np.zeros((*weights[-1].shape, 2), weights[-1].dtype)]
    return weights
