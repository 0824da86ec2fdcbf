"""The prepared run for a machine with a CUDA GPU: everything fastmil has to measure on one, in one command.

Usage (README "On a GPU machine"): ``python benchmarks/device_check.py --out DIR [--bench-budget SECONDS]``

A lent GPU machine comes for ~15 minutes, so the run is ordered by value and writes each section to ``DIR`` as it
finishes: a run stopped at its time limit still returns what it measured.

1. ``env.json``: torch, triton (and whether ``make aot`` checks that release), the GPU.
2. ``accuracy.json`` / ``accuracy.md``: every Triton op through its compiled kernels against an fp64 reference of
   the same inputs, forward and every gradient, on a ragged batch (a bag of one, sizes that no block divides, an
   all-masked bag; feature widths with a ragged tail) in fp32, fp16 and bf16. Next to each error stands the error of
   the torch path in fp32 on the CPU under the same metric: the interpreter tests prove the kernels' logic, this
   measures what the GPU adds (TF32 and tensor-core products, its own rounding), and it is what GPU tolerances must
   be set from. A non-finite result, or an error both above ``GROSS`` and 100x the torch path's, fails the run
   (after every section has run); anything else is reported as measured.
3. ``tests.log``: the tests that need CUDA (``pytest -m cuda``), run compiled (``TRITON_INTERPRET=0``).
4. ``bench/GROUP/``: the CUDA cases of the benchmark suite, one group at a time within ``--bench-budget`` seconds
   (:data:`BENCH_GROUPS`), each with its pytest-benchmark JSON and ``benchmarks/report.py``'s report.

``--device cpu`` runs section 2 alone, through the Triton interpreter at small sizes: ``make test`` runs it that way
so that this script keeps working on machines without a GPU. That proves nothing about a GPU.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GROSS = 1e-2
"""Errors above this (and 100x above the torch path's) fail the run: no rounding mode explains them."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results (created)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: the full run; cpu: the accuracy section through the Triton interpreter, small")
    parser.add_argument("--bench-budget", type=float, default=420.0,
                        help="seconds for section 4, the benchmark cases (0: leave them out)")
    return parser.parse_args(argv)


_ARGS = _parse_args(None) if __name__ == "__main__" else None
if _ARGS is not None:  # before triton is first imported: the interpreter for --device cpu, compiled kernels on CUDA
    os.environ["TRITON_INTERPRET"] = "1" if _ARGS.device == "cpu" else "0"

import torch  # noqa: E402

sys.path.insert(0, str(REPO))  # tests.ragged: the batches and error metrics of the unit tests
from fastmil.kernels.limits import CHECKED_TRITON  # noqa: E402
from fastmil.ops import (  # noqa: E402
    attention_pool,
    attention_pool_reference,
    gated_attention_pool,
    gated_attention_pool_reference,
    graph_attention,
    graph_attention_reference,
    grid_neighbours,
    linear_relu_dropout,
    saliency_mask,
)
from tests.ragged import make_mask, offsets_of, per_bag_error, relative_error  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    """The ragged batch and widths of one run: GPU-sized, or small enough for the interpreter."""

    bags: tuple[int, ...]
    dim: int
    embed: int
    dtypes: tuple[torch.dtype, ...]


FULL = Sizes(bags=(1, 7, 129, 1000, 4096, 20_011), dim=259, embed=300,
             dtypes=(torch.float32, torch.float16, torch.bfloat16))
QUICK = Sizes(bags=(1, 7, 45), dim=40, embed=24, dtypes=(torch.float32, torch.float16))


@dataclass
class Row:
    """One measured quantity of the Triton path on the device under test: mostly an output's largest error against
    the fp64 reference, beside the torch path's in fp32 on the CPU (the yardstick); ``limit``, where given, is the
    bound a correct kernel cannot exceed (0 for exact contracts, a binomial bound for a random share)."""

    op: str
    case: str
    dtype: str
    output: str
    metric: str
    triton: float
    torch_cpu: float | None = None
    limit: float | None = None

    @property
    def failed(self) -> bool:
        if not math.isfinite(self.triton):
            return True
        if self.limit is not None:
            return self.triton > self.limit
        return self.triton > GROSS and self.triton > 100 * max(self.torch_cpu or 0.0, 1e-12)


# ----------------------------------------------------------------------------------------------------------------
# running a case on a device, with gradients back on the CPU
# ----------------------------------------------------------------------------------------------------------------
def _leaves(tensors: list[torch.Tensor], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    return [t.detach().to(dtype).requires_grad_() for t, dtype in zip(tensors, dtypes)]


def _run(fn: Callable[..., tuple[torch.Tensor, ...]], inputs: list[torch.Tensor], weights: list[torch.Tensor],
         device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``fn(*inputs)`` on ``device`` (leaves on the CPU, moved differentiably), then the backward of
    ``sum_k <out_k, weights_k>`` in fp64: the outputs and the inputs' gradients, as fp64 CPU tensors."""
    moved = [t.to(device) for t in inputs]
    outs = fn(*moved)
    loss = sum((o.double() * w.to(o.device)).sum() for o, w in zip(outs, weights))
    loss.backward()
    grads = [torch.zeros_like(t, dtype=torch.float64) if t.grad is None else t.grad.double() for t in inputs]
    return [o.detach().double().cpu() for o in outs], grads


def _compare(op: str, case: str, dtype: torch.dtype, names: list[str], metrics: list[Callable],
             fn_triton: Callable, fn_torch: Callable, fn_ref: Callable, inputs: list[torch.Tensor],
             weights: list[torch.Tensor], input_dtypes: list[torch.dtype], device: str) -> list[Row]:
    """Run the three paths on the same (rounded) inputs and return one row per output and per gradient, and one for
    the Triton path's run-to-run difference (its kernels use no atomics: two runs must agree bit for bit)."""
    rounded = _leaves(inputs, input_dtypes)  # what every path sees
    triton_runs = [_run(fn_triton, _leaves(rounded, input_dtypes), weights, device) for _ in range(2)]
    out_c, grad_c = _run(fn_torch, _leaves(rounded, [torch.float32] * len(inputs)), weights, "cpu")
    out_r, grad_r = _run(fn_ref, _leaves(rounded, [torch.float64] * len(inputs)), weights, "cpu")
    first, second = ([*outs, *grads] for outs, grads in triton_runs)
    name = _dtype_name(dtype)
    rows = [Row(op, case, name, out, metric.__name__, metric(t, r), metric(c, r))
            for out, metric, t, c, r in zip(names, metrics, first, [*out_c, *grad_c], [*out_r, *grad_r])]
    rerun = max(float((a - b).abs().max()) if a.numel() else 0.0 for a, b in zip(first, second))
    rows.append(Row(op, case, name, "all", "run-to-run max difference", rerun, limit=0.0))
    return rows


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def absolute_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest ``|a - e|`` (for outputs that are exactly zero in exact arithmetic)."""
    return float((actual.double() - expected.double()).abs().max()) if expected.numel() else 0.0


def _bag_metric(offsets: torch.Tensor) -> Callable:
    def per_bag(actual, expected):
        return per_bag_error(actual, expected, offsets)

    return per_bag


# ----------------------------------------------------------------------------------------------------------------
# the ops
# ----------------------------------------------------------------------------------------------------------------
def check_attention_pool(sizes: Sizes, device: str) -> Iterator[Row]:
    offsets = offsets_of(list(sizes.bags))
    n, n_bags = int(offsets[-1]), len(sizes.bags)
    bag = _bag_metric(offsets)
    for heads in (None, 3):
        for dtype in sizes.dtypes:
            g = torch.Generator().manual_seed(1)
            shape = (n,) if heads is None else (n, heads)
            scores, values = torch.randn(shape, generator=g) * 3, torch.randn(n, sizes.dim, generator=g)
            mask = make_mask(list(sizes.bags), "all-masked-bag", g)
            pooled_shape = (n_bags, sizes.dim) if heads is None else (n_bags, heads, sizes.dim)
            weights = [torch.randn(pooled_shape, generator=g).double(), torch.randn(shape, generator=g).double()]

            def run(backend, mask=mask):
                return lambda s, v: attention_pool(s, v, offsets.to(s.device), mask.to(s.device), backend=backend)

            yield from _compare(
                "attention_pool", f"heads={heads}", dtype,
                # grad_scores of a bag of one is an exact 0 reached only up to fp32 cancellation: whole-tensor scale
                ["pooled", "weights", "grad_scores", "grad_values"], [relative_error, bag, relative_error, bag],
                run("triton"), run("torch"), lambda s, v, mask=mask: attention_pool_reference(s, v, offsets, mask),
                [scores, values], weights, [torch.float32, dtype], device)


def check_gated_attention_pool(sizes: Sizes, device: str) -> Iterator[Row]:
    offsets = offsets_of(list(sizes.bags))
    n, n_bags, dim, hidden = int(offsets[-1]), len(sizes.bags), sizes.dim, 24
    bag = _bag_metric(offsets)
    for mask_kind in ("all-masked-bag", "sparse"):
        for dtype in sizes.dtypes:
            g = torch.Generator().manual_seed(2)
            h = torch.randn(n, dim, generator=g)
            params = [torch.randn(hidden, dim, generator=g) / dim**0.5, torch.randn(hidden, generator=g) * 0.1,
                      torch.randn(hidden, dim, generator=g) / dim**0.5, torch.randn(hidden, generator=g) * 0.1,
                      torch.randn(1, hidden, generator=g) * 2, torch.randn(1, generator=g)]
            mask = make_mask(list(sizes.bags), mask_kind, g)
            weights = [torch.randn(n_bags, dim, generator=g).double(), torch.randn(n, generator=g).double()]

            def run(backend, mask=mask):
                return lambda x, *p: gated_attention_pool(x, *p, offsets.to(x.device), mask.to(x.device),
                                                          backend=backend)

            names = ["pooled", "weights", "grad_h", "grad_v_weight", "grad_v_bias", "grad_u_weight", "grad_u_bias",
                     "grad_w_weight", "grad_w_bias"]
            # softmax ignores a shift of every score: grad_w_bias is exactly 0, so its error is absolute
            metrics = [relative_error, bag, bag] + [relative_error] * 5 + [absolute_error]
            yield from _compare(
                "gated_attention_pool", f"mask={mask_kind}", dtype, names, metrics, run("triton"), run("torch"),
                lambda x, *p, mask=mask: gated_attention_pool_reference(x, *p, offsets, mask), [h, *params],
                weights, [dtype] + [torch.float32] * len(params), device)


def _grid_batch(sizes: Sizes, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch coordinates of each bag on a 256-pixel lattice with random holes, and the stencil table (radius 2)."""
    coords, offsets = [], [0]
    for size in sizes.bags:
        side = math.isqrt(2 * size) + 2
        cells = torch.randperm(side * side, generator=g)[:size]
        coords.append(torch.stack([cells % side, cells // side], 1) * 256)
        offsets.append(offsets[-1] + size)
    offsets_t = torch.tensor(offsets)
    return grid_neighbours(torch.cat(coords), offsets_t, radius=2, step=256, backend="torch"), offsets_t


def check_graph_attention(sizes: Sizes, device: str) -> Iterator[Row]:
    g = torch.Generator().manual_seed(3)
    nbr, _ = _grid_batch(sizes, g)
    n, heads, channels = nbr.shape[0], 4, max(8, sizes.dim // 8)
    for dtype in sizes.dtypes:
        x = torch.randn(n, heads, channels, generator=g)
        src, dst = torch.randn(n, heads, generator=g), torch.randn(n, heads, generator=g)
        weights = [torch.randn(n, heads, channels, generator=g).double()]

        def run(backend):
            return lambda xx, s, d: (graph_attention(xx, nbr.to(xx.device), s, d, backend=backend),)

        yield from _compare(
            "graph_attention", "radius=2", dtype, ["out", "grad_x", "grad_src", "grad_dst"],
            [relative_error] * 4, run("triton"), run("torch"),
            lambda xx, s, d: (graph_attention_reference(xx, nbr, s, d),), [x, src, dst], weights,
            [dtype, torch.float32, torch.float32], device)


def check_linear_relu_dropout(sizes: Sizes, device: str) -> Iterator[Row]:
    n = sum(sizes.bags)
    for dtype in sizes.dtypes:
        g = torch.Generator().manual_seed(4)
        x = torch.randn(n, sizes.dim, generator=g)
        weight, bias = torch.randn(sizes.embed, sizes.dim, generator=g) / sizes.dim**0.5, torch.randn(sizes.embed,
                                                                                                        generator=g)
        weights = [torch.randn(n, sizes.embed, generator=g).double()]

        def run(backend):
            return lambda xx, w, b: (linear_relu_dropout(xx, w, b, 0.25, training=False, backend=backend),)

        def reference(xx, w, b):
            return (torch.relu(xx @ w.T + b),)

        yield from _compare(
            "linear_relu_dropout", "eval", dtype, ["y", "grad_x", "grad_weight", "grad_bias"],
            [relative_error] * 4, run("triton"), run("torch"), reference, [x, weight, bias], weights,
            [dtype] * 3, device)
        # training: every entry is 0 or the eval value scaled by 1 / (1 - p); the dropped share is ~p
        xd, wd, bd = x.to(device, dtype), weight.to(device, dtype), bias.to(device, dtype)
        with torch.no_grad():
            y = linear_relu_dropout(xd, wd, bd, 0.25, training=True, backend="triton").double().cpu()
            full = linear_relu_dropout(xd, wd, bd, 0.25, training=False, backend="triton").double().cpu() / 0.75
        positive = full > 0
        dropped = (y == 0) & positive
        kept_err = relative_error(torch.where(dropped, full, y), full)
        n_positive = max(1, int(positive.sum()))
        share = float(dropped.sum()) / n_positive
        # the kept entries are the eval values times 1 / (1 - p), up to one rounding of y's dtype each way
        yield Row("linear_relu_dropout", "train p=0.25", _dtype_name(dtype), "kept entries", "relative_error",
                  kept_err, limit=4 * torch.finfo(dtype).eps)
        yield Row("linear_relu_dropout", "train p=0.25", _dtype_name(dtype), "dropped share of the positive entries",
                  "abs(share - 0.25)", abs(share - 0.25), limit=5 * math.sqrt(0.25 * 0.75 / n_positive))


def check_saliency_mask(sizes: Sizes, device: str) -> Iterator[Row]:
    offsets = offsets_of(list(sizes.bags))
    g = torch.Generator().manual_seed(5)
    n = int(offsets[-1])
    scores = torch.randint(0, 50, (n,), generator=g).float()  # ties on purpose
    mask = make_mask(list(sizes.bags), "all-masked-bag", g)
    expected = saliency_mask(scores, offsets, 0.03, 0.8, seed=7, mask=mask, backend="torch")
    actual = saliency_mask(scores.to(device), offsets.to(device), 0.03, 0.8, seed=7, mask=mask.to(device),
                           backend="triton", offsets_cpu=offsets)
    for name, a, e in zip(expected._fields, actual, expected):
        yield Row("saliency_mask", "ties, all-masked bag", "float32", name, "rows that differ from torch",
                  float((a.cpu() != e).sum()), limit=0.0)


CHECKS = [check_attention_pool, check_gated_attention_pool, check_graph_attention, check_linear_relu_dropout,
          check_saliency_mask]


# ----------------------------------------------------------------------------------------------------------------
# the sections
# ----------------------------------------------------------------------------------------------------------------
def environment() -> dict:
    import triton

    release = ".".join(triton.__version__.split(".")[:2])
    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "triton_checked_by_make_aot": release in CHECKED_TRITON, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
                   memory_gib=round(props.total_memory / 2**30, 1), tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return env


def accuracy(sizes: Sizes, device: str, out: Path) -> list[Row]:
    rows: list[Row] = []
    for check in CHECKS:
        start = time.perf_counter()
        try:
            rows.extend(check(sizes, device))
        except Exception as exc:  # reported and counted as a failure; the other ops still run
            rows.append(Row(check.__name__.removeprefix("check_"), "raised", "-", f"{type(exc).__name__}: {exc}",
                            "-", math.inf))
        print(f"  {check.__name__.removeprefix('check_')}: {time.perf_counter() - start:.1f} s", flush=True)
        _write_accuracy(rows, out)
    return rows


def _write_accuracy(rows: list[Row], out: Path) -> None:
    (out / "accuracy.json").write_text(json.dumps([asdict(r) | {"failed": r.failed} for r in rows], indent=1))
    lines = ["| op | case | dtype | output | metric | triton | torch fp32 (CPU) | limit | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.op} | {r.case} | {r.dtype} | {r.output} | {r.metric} | {r.triton:.3g} | "
                     f"{_fmt(r.torch_cpu)} | {_fmt(r.limit)} | {'FAILED' if r.failed else ''} |")
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3g}"


def _pytest(args: list[str], log: Path, env: dict, timeout: float | None = None) -> int:
    """``pytest args`` in the repository, its output in ``log`` (and its tail printed); a run past ``timeout``
    seconds is stopped and counts as failed (rc 124)."""
    with log.open("w") as f:
        try:
            code = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=REPO, stdout=f,
                                  stderr=subprocess.STDOUT, env=env, timeout=timeout, check=False).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\ndevice_check: stopped after {timeout:.0f} s\n")
            code = 124
    print(log.read_text()[-1500:], flush=True)
    return code


BENCH_GROUPS = [
    ("step", "test_bench_step.py", "cuda and time"),
    ("mhim", "test_bench_mhim.py", "cuda and time"),
    ("gated_pool", "test_bench_gated_pool.py", "cuda and time"),
    ("srmil", "test_bench_srmil.py", "cuda and time"),
    ("memory", "test_bench_step.py test_bench_mhim.py test_bench_gated_pool.py test_bench_srmil.py",
     "cuda and memory and (100000 or 50000 or 20000)"),
]
"""The CUDA benchmark cases in order of value, one pytest run (own folder, JSON and report) each, so that a run
stopped by the budget keeps the groups before it. Every group also runs the GEMM-rate case, the yardstick of its
report. The memory cases (a fresh process each) run at the largest sizes only."""


def benchmarks(out: Path, env: dict, budget: float) -> list[str]:
    """Run :data:`BENCH_GROUPS` within ``budget`` seconds; the failures, as lines."""
    failures, deadline = [], time.monotonic() + budget
    for name, files, select in BENCH_GROUPS:
        left = deadline - time.monotonic()
        if left < 30:
            failures.append(f"benchmarks {name}: not run, the {budget:.0f} s budget is spent")
            continue
        folder = out / "bench" / name
        folder.mkdir(parents=True, exist_ok=True)
        paths = [f"benchmarks/{f}" for f in files.split()] + ["benchmarks/test_bench_gemm.py"]
        code = _pytest([*paths, "-k", f"({select}) or gemm_rate[cuda]", "-q", "-o", "addopts=", "--benchmark-only",
                        f"--benchmark-json={folder / 'bench.json'}", "--benchmark-max-time=0.5",
                        "-p", "no:cacheprovider"], folder / "pytest.log", env, timeout=left)
        if code != 0:
            failures.append(f"benchmarks {name}: pytest exit {code} ({folder / 'pytest.log'})")
        if (folder / "bench.json").exists():
            subprocess.run([sys.executable, str(REPO / "benchmarks" / "report.py"), str(folder / "bench.json")],
                           cwd=REPO, env=env, check=False)
    return failures


def main(args: argparse.Namespace) -> int:
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("device_check: --device cuda needs a CUDA GPU (torch.cuda.is_available() is False); "
              "--device cpu checks the script itself through the interpreter", file=sys.stderr)
        return 2
    env = environment()
    (out / "env.json").write_text(json.dumps(env, indent=1))
    print(json.dumps(env), flush=True)
    failures = []

    print("accuracy of the Triton ops against fp64 references:", flush=True)
    rows = accuracy(QUICK if args.device == "cpu" else FULL, args.device, out)
    failures += [f"accuracy: {r.op} {r.case} {r.dtype} {r.output}: {r.triton:.3g}" for r in rows if r.failed]
    print((out / "accuracy.md").read_text(), flush=True)

    if args.device == "cuda":
        child_env = dict(os.environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1")
        print("the tests that need CUDA, compiled:", flush=True)
        if _pytest(["tests", "-m", "cuda", "-q", "-p", "no:cacheprovider"], out / "tests.log", child_env) != 0:
            failures.append("pytest -m cuda failed (tests.log)")
        if args.bench_budget > 0:
            print("the CUDA benchmark cases:", flush=True)
            failures += benchmarks(out, child_env, args.bench_budget)
    for line in failures:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(_ARGS))
