"""Helpers shared by the tests (importable as ``helpers`` through pytest's ``pythonpath`` setting)."""

import os
from pathlib import Path

TESTS_DIR = Path(__file__).resolve().parents[1]


def subprocess_env(**overrides: str) -> dict[str, str]:
    """The environment for a test's subprocess: offline, and able to import the tests' helpers."""
    path = os.pathsep.join(p for p in (str(TESTS_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path, **overrides}
