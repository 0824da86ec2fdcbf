"""Shared fixtures. Real data lives in ../shared/data beside the repository (FASTMIL_SHARED_DATA overrides)."""
from __future__ import annotations

import os

# The Triton kernels run on CPU tensors only through the interpreter, which must be switched on before triton is
# first imported (fastmil imports it lazily, so setting it here is early enough for the whole session).
os.environ.setdefault("TRITON_INTERPRET", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FASTMIL_SHARED_DATA", REPO.parent / "shared" / "data"))
CLAM_COORDS = SHARED_DATA / "clam_coords"
CMU_SLIDE = SHARED_DATA / "wsi" / "CMU-1-Small-Region.svs"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data not found at {path} (set FASTMIL_SHARED_DATA)")
    return path


@pytest.fixture
def clam_coords_dir() -> Path:
    return require(CLAM_COORDS)


@pytest.fixture
def cmu_slide() -> Path:
    return require(CMU_SLIDE)


@pytest.fixture
def nan_filled_empty():
    """For one test, ``torch.empty`` (and ``empty_like``) fill new tensors with NaN (torch's deterministic mode, warn
    only), so that code reading memory it never wrote gives NaN instead of the zeros fresh pages usually hold."""
    import torch

    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
