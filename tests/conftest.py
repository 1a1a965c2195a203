"""Test set-up: the TensorFlow switches first, and small shared fixtures."""

from __future__ import annotations

import numpy as np
import pytest

import shared.tfenv  # noqa: F401  (before anything imports TensorFlow)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
