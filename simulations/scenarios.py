"""Named scenarios: TOML files of run-config overrides in ``simulations/scenarios/``."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from shared.config import ConfigError

SCENARIO_DIR = Path(__file__).parent / "scenarios"


def available() -> dict[str, str]:
    """Scenario name -> one-line description."""
    return {path.stem: _read(path).get("description", "") for path in sorted(SCENARIO_DIR.glob("*.toml"))}


def overrides(name: str) -> dict[str, Any]:
    path = SCENARIO_DIR / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown scenario {name!r}; available: {', '.join(available())}")
    return dict(_read(path).get("config", {}))


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from err
