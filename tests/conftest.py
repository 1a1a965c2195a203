"""Test set-up: the TensorFlow switches first, and small shared fixtures."""

from __future__ import annotations

import shared.tfenv  # noqa: F401  (import-time switches before TensorFlow: keep first)

# isort: split

import numpy as np
import pytest


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
