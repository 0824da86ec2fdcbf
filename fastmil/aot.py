"""Ahead-of-time compile checks for every fastmil Triton kernel, without a GPU (``make aot``).

Every kernel is compiled with ``triton.compile`` for every specialisation its launcher can pick (dtypes, block
configs, ``H_PAD``/``HID_PAD``, boolean feature flags, fp32 dot precision) and for each target (sm_80 = A100,
sm_90 = H100/H200). The PTX is assembled with the ptxas bundled in the triton wheel (the one triton itself uses
for that target) with ``-v``, and a table of registers, spilled bytes and shared memory is printed. The run fails
(exit 1) on any spill, on shared memory above the target's per-block limit, or on a compile error.

Pointers are compiled with the 16-byte alignment hint that every fresh torch allocation gets at run time; integer
arguments without divisibility hints (the general case; D and strides that are multiples of 16 only make the
code simpler).

``TRITON_INTERPRET`` must be unset for this process (the interpreter replaces the compiler); this module removes
it from its own environment before importing triton and refuses to run if triton was already imported with it.

Usage: ``python -m fastmil.aot [--targets 80,90] [--kernel NAME] [--jobs N] [--json PATH]``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["SHARED_LIMIT", "CompileResult", "KernelSpec", "all_specs", "compile_spec", "main"]

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
"""Largest dynamic shared memory per block (bytes): A100 163 KiB, H100 227 KiB (CUDA programming guide)."""

DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation: kernel name, pointer types by argument name, constexprs, launch options."""

    kernel: str
    pointers: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    num_stages: int

    @property
    def label(self) -> str:
        ptr = dict(self.pointers)
        dtype = next((ptr[k] for k in ("h_ptr", "values_ptr", "scores_ptr", "dpre_ptr") if k in ptr), "-")
        consts = " ".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{dtype.lstrip('*')} {consts} w{self.num_warps}s{self.num_stages}"


@dataclass
class CompileResult:
    kernel: str
    config: str
    target: int
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    seconds: float = 0.0
    error: str = ""
    problems: list[str] = field(default_factory=list)


def _flags(**choices: tuple) -> list[dict]:
    keys = list(choices)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(choices[k] for k in keys))]


def _dtype_precisions() -> list[tuple[str, str, bool]]:
    """(dtype, DOT_PRECISION, UPCAST) as chosen by ``fastmil.ops._triton`` on a GPU: fp32 takes tf32x3, or tf32
    when ``torch.backends.cuda.matmul.allow_tf32`` is set; fp16/bf16 take tf32 and native-dtype score GEMMs."""
    return [("fp32", "tf32x3", True), ("fp32", "tf32", True), ("fp16", "tf32", False), ("bf16", "tf32", False)]


def all_specs() -> list[KernelSpec]:
    """Every specialisation the launchers in ``fastmil.ops`` can request."""
    from fastmil.kernels import attention_pool as k

    specs: list[KernelSpec] = []

    def add(kernel: str, pointers: dict, consts: dict, cfg) -> None:
        args = getattr(k, kernel).arg_names
        pointers = {name: ty for name, ty in pointers.items() if name in args}  # `index` lists every kernel's
        specs.append(KernelSpec(kernel, tuple(pointers.items()), tuple(consts.items()), cfg.num_warps, cfg.num_stages))

    index = {"tile_bag_ptr": "*i32", "tile_start_ptr": "*i64", "tile_end_ptr": "*i64", "mask_ptr": "*i1"}
    f32 = "*fp32"
    # given-scores attention_pool: values dtype x scores dtype x heads
    for (vdt, prec, _), sdt, h_pad in itertools.product(_dtype_precisions(), DTYPES, (16, 32)):
        cfg = k.pool_config(h_pad, vdt == "fp32")
        for flags in _flags(HAS_MASK=(False, True)):
            ptr = {"scores_ptr": f"*{sdt}", "values_ptr": f"*{vdt}", **index, "tile_max_ptr": f32,
                   "tile_sum_ptr": f32, "partial_ptr": f32}
            add("pool_fwd_tile_kernel", ptr, dict(BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, H_PAD=h_pad, **flags,
                                                  DOT_PRECISION=prec), cfg)
    for (vdt, prec, _), h_pad in itertools.product(_dtype_precisions(), (16, 32)):
        cfg = k.pool_config(h_pad, vdt == "fp32")
        for flags in _flags(HAS_GRAD_WEIGHTS=(False, True), NEED_GRAD_VALUES=(False, True)):
            ptr = {"values_ptr": f"*{vdt}", "weights_ptr": f32, "grad_pooled_ptr": f32, "bag_dot_ptr": f32,
                   "grad_weights_ptr": f32, **index, "grad_scores_ptr": f32, "grad_values_ptr": f"*{vdt}"}
            add("pool_bwd_tile_kernel", ptr, dict(BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, H_PAD=h_pad, **flags,
                                                  DOT_PRECISION=prec), cfg)
    for sdt, h_pad in itertools.product(DTYPES, (1, 16, 32)):
        if h_pad == 1 and sdt != "fp32":
            continue  # H_PAD=1 is the gated op's in-place pass over fp32 raw scores
        if h_pad == 1:  # the gated op launches it with its own tile size
            block_ns = {k.gated_fwd_config(p, f).block_n for p in (16, 32, 64, 128, 256) for f in (False, True)}
        else:  # the values dtype picks the tile size
            block_ns = {k.pool_config(h_pad, f).block_n for f in (False, True)}
        for bn, flags in itertools.product(sorted(block_ns), _flags(HAS_MASK=(False, True))):
            ptr = {"scores_ptr": f"*{sdt}", **index, "lse_ptr": f32, "weights_ptr": f32}
            add("normalize_weights_kernel", ptr, dict(BLOCK_N=bn, H_PAD=h_pad, **flags), k.KernelConfig(bn, 0, 4, 2))
    mcfg = k.merge_config()
    add("merge_tiles_kernel", {"tile_max_ptr": f32, "tile_sum_ptr": f32, "partial_ptr": f32,
                               "bag_tiles_ptr": "*i64", "pooled_ptr": f32, "lse_ptr": f32},
        {"BLOCK_T": mcfg.block_n, "BLOCK_D": mcfg.block_d}, mcfg)
    # fused gated pooling
    for (dt, prec, upcast), hid_pad in itertools.product(_dtype_precisions(), (16, 32, 64, 128, 256)):
        # V and U arrive in the score GEMM's dtype (fastmil.ops.gated_attention_pool._score_weights)
        score_w = f32 if upcast else f"*{dt}"
        params = {"vw_ptr": score_w, "vb_ptr": f32, "uw_ptr": score_w, "ub_ptr": f32, "ww_ptr": f32, "wb_ptr": f32}
        cfg = k.gated_fwd_config(hid_pad, dt == "fp32")
        for flags in _flags(HAS_MASK=(False, True)):
            ptr = {"h_ptr": f"*{dt}", **params, **index, "scores_ptr": f32, "tile_max_ptr": f32,
                   "tile_sum_ptr": f32, "partial_ptr": f32}
            add("gated_fwd_tile_kernel", ptr, dict(BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, HID_PAD=hid_pad, **flags,
                                                   UPCAST=upcast, DOT_PRECISION=prec), cfg)
        cfg = k.gated_bwd_config(hid_pad, dt == "fp32")
        for flags in _flags(HAS_MASK=(False, True), HAS_GRAD_WEIGHTS=(False, True)):
            ptr = {"h_ptr": f"*{dt}", **params, **index, "lse_ptr": f32, "grad_pooled_ptr": f32,
                   "bag_dot_ptr": f32, "grad_weights_ptr": f32, "dpre_ptr": f32,
                   "grad_s_ptr": f32, "grad_w_partial_ptr": f32}
            add("gated_bwd_tile_kernel", ptr, dict(BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, HID_PAD=hid_pad, **flags,
                                                   UPCAST=upcast, DOT_PRECISION=prec), cfg)
        gemm = {"BLOCK_K": k.gemm_block_k(hid_pad), "K": 2 * hid_pad, "DOT_PRECISION": prec}
        cfg = k.grad_h_config(hid_pad, dt == "fp32")
        add("grad_h_kernel", {"dpre_ptr": f32, "w2_ptr": f32, "weights_ptr": f32, "grad_pooled_ptr": f32, **index,
                              "grad_h_ptr": f"*{dt}"}, dict(BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, **gemm), cfg)
        cfg = k.weight_grad_config(hid_pad)
        add("weight_grad_kernel", {"dpre_ptr": f32, "h_ptr": f"*{dt}", "partial_ptr": f32},
            dict(BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, **gemm), cfg)
    return specs


def _parse_ptxas(log: str) -> tuple[int, int]:
    """(registers, spilled bytes = spill stores + spill loads) from ``ptxas -v`` output."""
    import re

    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))


def compile_spec(spec: KernelSpec, capability: int) -> CompileResult:
    """Compile one specialisation for ``sm_<capability>`` and measure it (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource

    from fastmil.kernels import attention_pool as k

    result = CompileResult(spec.kernel, spec.label, capability)
    start = time.perf_counter()
    try:
        fn = getattr(k, spec.kernel)
        pointers, consts = dict(spec.pointers), dict(spec.constexprs)
        unknown = set(pointers) - set(fn.arg_names)
        if unknown:
            raise ValueError(f"spec names arguments the kernel does not have: {sorted(unknown)}")
        signature = {}
        for name in fn.arg_names:
            if name in consts:
                signature[name] = "constexpr"
            elif name.endswith("_ptr"):
                if name not in pointers:
                    raise ValueError(f"no pointer type given for {name}")
                signature[name] = pointers[name]
            else:
                signature[name] = "i32"
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n.endswith("_ptr")}
        compiled = triton.compile(
            ASTSource(fn, signature, consts, attrs),
            target=GPUTarget("cuda", capability, 32),
            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
        )
        result.shared_bytes = int(compiled.metadata.shared)
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "kernel.ptx"
            ptx.write_text(compiled.asm["ptx"])
            proc = subprocess.run(
                [get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                 str(ptx), "-o", str(Path(tmp) / "kernel.cubin")],
                capture_output=True, text=True, check=False,
            )
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas failed: {proc.stderr.strip()[-500:]}")
        result.registers, result.spill_bytes = _parse_ptxas(proc.stdout + proc.stderr)
    # any failure of one build (a triton CompilationError, ptxas, a bad spec) is reported in its table row and
    # makes the run exit 1; one bad specialisation must not hide the results of all the others
    except Exception as exc:  # noqa: BLE001
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    result.seconds = time.perf_counter() - start
    if result.error:
        result.problems.append("compile error")
    if result.spill_bytes > 0:
        result.problems.append(f"spills {result.spill_bytes} B")
    if result.shared_bytes > SHARED_LIMIT[capability]:
        result.problems.append(f"shared {result.shared_bytes} B > {SHARED_LIMIT[capability]} B")
    return result


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _run(job: tuple[KernelSpec, int]) -> CompileResult:
    return compile_spec(*job)


def _table(results: list[CompileResult]) -> str:
    rows = [("kernel", "config", "target", "regs", "spill B", "smem B", "s", "status")]
    for r in results:
        status = "ok" if not r.problems else "; ".join(r.problems) + (f" ({r.error})" if r.error else "")
        rows.append((r.kernel, r.config, f"sm_{r.target}", str(r.registers), str(r.spill_bytes),
                     str(r.shared_bytes), f"{r.seconds:.1f}", status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmil.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--kernel", default=None, help="only kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("fastmil.aot: triton was imported with TRITON_INTERPRET set; run in a fresh process", file=sys.stderr)
        return 2
    _worker_init()
    targets = [int(t) for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in SHARED_LIMIT]
    if unknown:
        print(f"fastmil.aot: unsupported targets {unknown}; known: {sorted(SHARED_LIMIT)}", file=sys.stderr)
        return 2
    specs = [s for s in all_specs() if args.kernel is None or args.kernel in s.kernel]
    jobs = [(spec, cap) for spec in specs for cap in targets]
    print(f"compiling {len(specs)} kernel specialisations x {len(targets)} targets = {len(jobs)} builds "
          f"with {args.jobs} processes", flush=True)
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), initializer=_worker_init) as pool:
        results = list(pool.map(_run, jobs, chunksize=4))
    print(_table(results))
    bad = [r for r in results if r.problems]
    worst = max((r.registers for r in results), default=0)
    print(f"\n{len(results)} builds in {time.perf_counter() - start:.0f} s; max registers {worst}; "
          f"{len(bad)} with problems")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
