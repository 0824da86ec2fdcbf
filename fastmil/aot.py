"""Ahead-of-time compile checks for every fastmil Triton kernel, without a GPU (``make aot``).

Discovery: every module of ``fastmil.kernels`` that defines ``aot_launches()`` is a kernel family; that
function yields :class:`fastmil.kernels._launch.Launch` objects built by the *same* launch functions the ops
run, over representative arguments (dtypes, feature widths, row layouts, masks, heads/hidden sizes). Adding a
kernel means adding files, not editing this module.

Specialisation: each launch goes through Triton's own argument binder (the code ``JITFunction.run`` executes
before compiling), so integer arguments divisible by 16 get the divisibility hint, integers equal to 1 become
constants, bool tensors are ``*u1``, unaligned pointers lose the alignment hint and ``num_stages`` is what the
launch states. Launches that specialise identically are compiled once. Both fp32 TF32 settings
(``torch.backends.cuda.matmul.allow_tf32``) are covered.

Each specialisation is compiled for each target (sm_80 = A100, sm_90 = H100/H200); the PTX is assembled with the
ptxas bundled in the triton wheel with ``-v``. The run fails (exit 1) on any register spill, on shared memory
above the target's per-block limit, or on a compile error. Results are cached per triton version and kernel
source in ``--cache`` (default ``bench_out/aot-cache.json``), so re-runs recompile only what changed.

``TRITON_INTERPRET`` must be unset for this process (the interpreter replaces the compiler).

Usage: ``python -m fastmil.aot [--targets 80,90] [--kernel NAME] [--jobs N] [--json PATH] [--verbose]``;
``python -m fastmil.aot --matrix bench_out/aot-triton-*.json`` prints the per-release table of ``make aot``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._atomic import write_text_atomic

__all__ = ["SHARED_LIMIT", "CompileResult", "Specialisation", "collect_specialisations", "compile_specialisation",
           "kernel_modules", "main", "specialise"]

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
"""Largest dynamic shared memory per block (bytes): A100 163 KiB, H100 227 KiB (CUDA programming guide)."""


@dataclass(frozen=True)
class Specialisation:
    """One compiled variant of a kernel, as Triton's binder derives it from a launch's arguments."""

    module: str
    kernel: str
    signature: tuple[tuple[str, str], ...]  # parameter name -> Triton type ("*fp16", "i32", "constexpr")
    constants: tuple[tuple[str, Any], ...]  # parameter name -> constexpr value (incl. ints specialised to 1)
    attrs: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]  # parameter name -> compiler attributes
    num_warps: int
    num_stages: int

    @property
    def divisible(self) -> tuple[str, ...]:
        """Parameters with Triton's divisibility-by-16 hint (pointers: 16-byte alignment)."""
        return tuple(name for name, attrs in self.attrs if ("tt.divisibility", 16) in attrs)

    @property
    def label(self) -> str:
        """A compact description: main dtype, the runtime-specialised arguments, the constexprs, warps/stages."""
        sig = dict(self.signature)
        main = ("h_ptr", "values_ptr", "x_ptr", "scores_ptr", "dout_ptr", "dpre_ptr", "tile_max_ptr")
        main_ptr = next((n for n in main if n in sig), None)
        dtype = sig[main_ptr].lstrip("*") if main_ptr else "-"
        consts = dict(self.constants)
        # runtime integers, and those Triton made constants because they were 1 (constexpr parameters are upper case)
        ints = [n for n, t in self.signature
                if (t[0] in "iu" or (t == "constexpr" and not n.isupper())) and not n.endswith("_ptr")]
        runtime = [f"{n}={consts[n]}" if n in consts else (f"{n}%16" if n in self.divisible else n) for n in ints]
        ptrs = [n for n, t in self.signature if t.startswith("*")]
        unaligned = [n.removesuffix("_ptr") for n in ptrs if n not in self.divisible]
        flags = " ".join(f"{k}={v}" for k, v in self.constants if k.isupper())
        misaligned = f" unaligned({','.join(unaligned)})" if unaligned else ""
        mask = f" mask={sig['mask_ptr'].lstrip('*')}" if "mask_ptr" in sig else ""
        outs = [n for n in ("ddst_ptr", "dsrc_ptr") if n in sig]  # graph: the score gradients' dtype
        mask += "".join(f" {n.removesuffix('_ptr')}={sig[n].lstrip('*')}" for n in outs)
        return f"{dtype}{mask} [{' '.join(runtime)}]{misaligned} {flags} w{self.num_warps}s{self.num_stages}"


@dataclass
class CompileResult:
    module: str
    kernel: str
    config: str
    target: int
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    seconds: float = 0.0
    cached: bool = False
    error: str = ""
    problems: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------------
# discovery and specialisation (main process)
# ----------------------------------------------------------------------------------------------------------------
def kernel_modules() -> list[Any]:
    """Every module of ``fastmil.kernels`` that declares ``aot_launches()``."""
    import fastmil.kernels as pkg

    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if callable(getattr(module, "aot_launches", None)):
            found.append(module)
    return found


def jit_kernels(module: Any) -> set[str]:
    """Names of the ``@triton.jit`` kernels (``*_kernel``) defined in ``module`` itself."""
    return {
        name for name, obj in vars(module).items()
        if name.endswith("_kernel") and hasattr(obj, "arg_names")
        and getattr(obj, "__module__", None) == module.__name__
    }


def _runtime_kwargs(fn: Any, launch: Any) -> dict:
    """The keyword arguments ``JITFunction.run`` hands to the binder for this launch."""
    from triton import knobs

    kwargs = {**launch.args, "num_warps": launch.num_warps, "num_stages": launch.num_stages}
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # triton >= 3.9
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    return kwargs


def specialise(launch: Any, backend: Any) -> Specialisation:
    """The specialisation Triton's runtime would compile for ``launch`` (its binder, its ``_pack_args``)."""
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = _runtime_kwargs(fn, launch)
    bound, spec, options = binder(**kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    names = list(fn.arg_names)
    constants = tuple((names[path[0]], value) for path, value in sorted(constexprs.items()))
    exact_attrs = tuple((names[path[0]], tuple(tuple(a) for a in values)) for path, values in sorted(attrs.items()))
    return Specialisation(
        module=fn.__module__, kernel=fn.__name__, signature=tuple((n, signature[n]) for n in names),
        constants=constants, attrs=exact_attrs, num_warps=options.num_warps, num_stages=options.num_stages,
    )


def collect_specialisations(kernel_filter: str | None = None) -> list[Specialisation]:
    """Distinct specialisations of every discovered launch, under both fp32 TF32 settings, in discovery order."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))  # argument specialisation does not depend on the arch
    seen: dict[Specialisation, None] = {}
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        for allow_tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            for module in kernel_modules():
                for launch in module.aot_launches():
                    if kernel_filter is None or kernel_filter in launch.name:
                        seen.setdefault(specialise(launch, backend), None)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return list(seen)


# ----------------------------------------------------------------------------------------------------------------
# compilation (worker processes)
# ----------------------------------------------------------------------------------------------------------------
def _parse_ptxas(log: str) -> tuple[int, int]:
    """(registers, spilled bytes = spill stores + spill loads) from ``ptxas -v`` output."""
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or spills is None:
        raise RuntimeError(f"unexpected ptxas output:\n{log}")
    return int(regs.group(1)), int(spills.group(1)) + int(spills.group(2))


def compile_specialisation(spec: Specialisation, capability: int) -> CompileResult:
    """Compile one specialisation for ``sm_<capability>`` and measure registers, spills and shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    from triton.compiler import ASTSource, make_backend

    result = CompileResult(spec.module, spec.kernel, spec.label, capability)
    start = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(spec.module), spec.kernel)
        names = list(fn.arg_names)
        signature = dict(spec.signature)
        constexprs = {(names.index(n),): v for n, v in spec.constants}
        attrs = {(names.index(n),): [list(a) for a in values] for n, values in spec.attrs}
        target = GPUTarget("cuda", capability, 32)
        options = make_backend(target).parse_options({"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
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
        text = str(exc).strip()
        result.error = f"{type(exc).__name__}: {text.splitlines()[-1] if text else ''}"
    result.seconds = time.perf_counter() - start
    _judge(result)
    return result


def _judge(result: CompileResult) -> None:
    result.problems = []
    if result.error:
        result.problems.append("compile error")
    if result.spill_bytes > 0:
        result.problems.append(f"spills {result.spill_bytes} B")
    if result.shared_bytes > SHARED_LIMIT[result.target]:
        result.problems.append(f"shared {result.shared_bytes} B > {SHARED_LIMIT[result.target]} B")


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (it warns otherwise)


def _run(job: tuple[Specialisation, int]) -> CompileResult:
    return compile_specialisation(*job)


# ----------------------------------------------------------------------------------------------------------------
# cache and report
# ----------------------------------------------------------------------------------------------------------------
def _cache_key(spec: Specialisation, capability: int) -> str:
    """Triton version + the kernel's source hash (incl. the jit functions it calls) + the specialisation."""
    import triton

    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    text = json.dumps([triton.__version__, fn.cache_key, repr(spec), capability])
    return hashlib.sha256(text.encode()).hexdigest()


def _load_cache(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a damaged cache only costs a recompile


def _table(results: Iterable[CompileResult]) -> str:
    rows = [("kernel", "specialisation", "target", "regs", "spill B", "smem B", "status")]
    for r in results:
        status = "ok" if not r.problems else "; ".join(r.problems) + (f" ({r.error})" if r.error else "")
        rows.append((r.kernel, r.config, f"sm_{r.target}", str(r.registers), str(r.spill_bytes), str(r.shared_bytes),
                     status))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _summary(results: list[CompileResult]) -> str:
    rows = [("kernel", "target", "builds", "max regs", "max smem B", "spills", "errors")]
    keys = sorted({(r.kernel, r.target) for r in results})
    for kernel, target in keys:
        group = [r for r in results if r.kernel == kernel and r.target == target]
        rows.append((kernel, f"sm_{target}", str(len(group)), str(max(r.registers for r in group)),
                     str(max(r.shared_bytes for r in group)), str(sum(r.spill_bytes > 0 for r in group)),
                     str(sum(bool(r.error) for r in group))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def matrix_markdown(paths: list[Path]) -> str:
    """A markdown table of ``--json`` results from several triton releases: builds, largest register count and
    spilling builds per kernel, target and release."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    versions = [r["triton"] for r in runs]
    kernels = sorted({(res["kernel"], res["target"]) for r in runs for res in r["results"]})
    head = "| kernel | target | " + " | ".join(f"triton {v}: builds / max regs / spills" for v in versions) + " |"
    lines = [head, "|" + "---|" * (2 + len(versions))]
    for kernel, target in kernels:
        cells = []
        for r in runs:
            group = [x for x in r["results"] if x["kernel"] == kernel and x["target"] == target]
            bad = sum(x["spill_bytes"] > 0 or bool(x["error"]) for x in group)
            cells.append(f"{len(group)} / {max(x['registers'] for x in group)} / {bad}" if group else "-")
        lines.append(f"| `{kernel}` | sm_{target} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmil.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--kernel", default=None, help="only kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument("--cache", default="bench_out/aot-cache.json",
                        help="results cache (default %(default)s); --cache '' disables it")
    parser.add_argument("--verbose", action="store_true", help="print every build, not only the problems")
    parser.add_argument("--matrix", type=Path, nargs="+", default=None, metavar="JSON",
                        help="only print a markdown table of earlier --json results (one per triton release)")
    args = parser.parse_args(argv)
    if args.matrix:
        print(matrix_markdown(args.matrix))
        return 0
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("fastmil.aot: triton was imported with TRITON_INTERPRET set; run in a fresh process", file=sys.stderr)
        return 2
    _worker_init()
    targets = [int(t) for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in SHARED_LIMIT]
    if unknown:
        print(f"fastmil.aot: unsupported targets {unknown}; known: {sorted(SHARED_LIMIT)}", file=sys.stderr)
        return 2
    import triton

    start = time.perf_counter()
    specs = collect_specialisations(args.kernel)
    cache_path = Path(args.cache) if args.cache else None  # (Path("") would be ".", never empty)
    cache = _load_cache(cache_path)
    jobs, results, keys = [], {}, {}
    for spec in specs:
        for cap in targets:
            key = keys[(spec, cap)] = _cache_key(spec, cap)
            if key in cache:
                results[(spec, cap)] = CompileResult(**{**cache[key], "cached": True})
            else:
                jobs.append((spec, cap))
    print(f"triton {triton.__version__}: {len(specs)} kernel specialisations x {len(targets)} targets = "
          f"{len(specs) * len(targets)} builds ({len(jobs)} to compile, {len(results)} cached) with {args.jobs} "
          "processes", flush=True)
    if jobs:
        with ProcessPoolExecutor(max_workers=max(1, args.jobs), initializer=_worker_init) as pool:
            for job, result in zip(jobs, pool.map(_run, jobs, chunksize=4)):
                results[job] = result
    ordered = [results[(spec, cap)] for spec in specs for cap in targets]
    if cache_path is not None:
        for (spec, cap), r in results.items():
            if not r.error:  # errors are retried next time
                cache[keys[(spec, cap)]] = {k: v for k, v in asdict(r).items() if k != "cached"}
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(cache_path, json.dumps(cache))
    bad = [r for r in ordered if r.problems]
    print(_summary(ordered))
    if args.verbose or bad:
        print()
        print(_table(ordered if args.verbose else bad))
    worst = max((r.registers for r in ordered), default=0)
    print(f"\ntriton {triton.__version__}: {len(ordered)} builds in {time.perf_counter() - start:.0f} s; "
          f"max registers {worst}; {len(bad)} with problems")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"triton": triton.__version__, "results": [asdict(r) for r in ordered]}
        write_text_atomic(args.json, json.dumps(report, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
