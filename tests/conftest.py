"""Shared fixtures: the reference data in ../shared and tiny synthetic datasets made per session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
sys.path.insert(0, str(ROOT))


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test (with the reason) when it is absent."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"reference data {p} is absent (the ../shared folder is not beside the project)")
    return p


@pytest.fixture(scope="session")
def probav_root() -> Path:
    return shared_path("probav")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small synthetic dataset: 3 train, 2 val, 2 test scenes per band."""
    from data.synthetic import generate
    return generate(tmp_path_factory.mktemp("syn") / "root", n_train=3, n_val=2, n_test=2, seed=1)
