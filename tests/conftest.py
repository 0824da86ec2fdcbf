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


def pytest_configure(config):
    """``FASTMIL_TORCH_THREADS=N`` runs the session with ``torch.set_num_threads(N)`` (the suite must pass with 1
    and with 2: the reduction order of torch's CPU kernels depends on it)."""
    threads = os.environ.get("FASTMIL_TORCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def _code_path() -> str:
    import torch

    paths = {name: os.environ.get(name, "unset") for name in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "OPENBLAS_CORETYPE")}
    return (f"numeric code path: torch {torch.__version__}, {torch.get_num_threads()} thread(s), ATen CPU capability "
            f"{torch.backends.cpu.get_cpu_capability()}, " + ", ".join(f"{k}={v}" for k, v in paths.items()))


def pytest_report_header(config):
    return _code_path()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The largest error-to-bound ratio per op family (tests/tolerance.py), and the same as JSON in
    ``$FASTMIL_TOLERANCE_REPORT`` when set."""
    from tests.tolerance import DETAIL, RATIOS, WORST

    if not RATIOS:
        return
    terminalreporter.section("largest error / bound per family (tests/tolerance.py)")
    terminalreporter.write_line(_code_path())
    for family in sorted(RATIOS):
        terminalreporter.write_line(f"{family:28s} {RATIOS[family]:.3f}  {WORST.get(family, '')}")
    report = os.environ.get("FASTMIL_TOLERANCE_REPORT")
    if report:
        import json

        rows = {family: {"ratio": RATIOS[family], "where": WORST.get(family, "")} for family in sorted(RATIOS)}
        detail = dict(sorted(DETAIL.items()))
        payload = {"code_path": _code_path(), "families": rows, "quantities": detail}
        Path(report).write_text(json.dumps(payload, indent=1) + "\n")
