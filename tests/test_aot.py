"""The ahead-of-time compile checker (fastmil.aot): coverage of the kernels, ptxas parsing, one real build."""
import os
import subprocess
import sys

import pytest

from fastmil import aot
from fastmil.kernels import attention_pool as kernels


def test_every_kernel_has_specialisations():
    jitted = {name for name in dir(kernels) if name.endswith("_kernel") and hasattr(getattr(kernels, name), "arg_names")}
    assert jitted, "expected @triton.jit kernels in fastmil.kernels.attention_pool"
    assert {spec.kernel for spec in aot.all_specs()} == jitted


def test_specs_name_only_real_arguments():
    for spec in aot.all_specs():
        args = getattr(kernels, spec.kernel).arg_names
        assert {name for name, _ in spec.pointers} <= set(args), spec.label
        assert {name for name, _ in spec.constexprs} <= set(args), spec.label


def test_parse_ptxas_output():
    log = (
        "ptxas info    : Function properties for k\n"
        "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 96 registers, used 1 barriers, 536 bytes cmem[0]\n"
    )
    assert aot._parse_ptxas(log) == (96, 20)
    with pytest.raises(RuntimeError, match="unexpected ptxas output"):
        aot._parse_ptxas("nothing useful")


def test_refuses_to_run_inside_an_interpreted_process():
    import triton  # noqa: F401  (imported here with TRITON_INTERPRET=1, set by conftest)

    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert aot.main(["--kernel", "merge"]) == 2


def test_compiles_a_kernel_family_for_sm80_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "fastmil.aot", "--kernel", "merge_tiles", "--targets", "80", "--jobs", "1"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "merge_tiles_kernel" in proc.stdout and "sm_80" in proc.stdout
    assert "0 with problems" in proc.stdout
