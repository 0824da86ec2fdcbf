"""The prepared run for a machine with a CUDA GPU: everything fastmil has to measure on one, in one command.

Usage (README "On a GPU machine"): ``python benchmarks/device_check.py --out DIR [--deadline SECONDS]``

A lent GPU machine comes for minutes, so the run is ordered by value, keeps to ``--deadline`` (what does not fit is
listed as not run, apart from failures) and writes each section to ``DIR`` as it finishes:

1. ``env.json``: torch, triton (and whether ``make aot`` checks that release), the GPU, and the Python modules the
   later sections import that are missing.
2. ``accuracy.json`` / ``accuracy.md``: every Triton op through its compiled kernels, forward and every gradient, on
   a ragged batch (a bag of one, sizes that no block divides, an all-masked bag; feature widths with a ragged tail)
   in fp32, fp16 and bf16, against an fp64 reference of the same inputs (``saliency_mask``: the torch path's sets,
   exactly). Inputs a path rounds (the gate weights V, U; graph scores) are rounded before any path sees them.
   Next to each error stands the torch path's on the CPU with the same input dtypes, under the same metric: the
   interpreter tests prove the kernels' logic, this measures what the GPU adds (TF32 and tensor-core products, its
   own rounding), and it is what GPU tolerances must be set from. TF32 is off for fp32 GEMMs (torch's default):
   fp32 ``tl.dot`` runs as 3xTF32. Failing rows: a non-finite error, an error above ``FAIL_FACTOR`` x the torch
   path's and above the dtype's floor (:data:`FLOOR`), or above a row's own ``limit`` (0 for exact contracts and
   the run-to-run check: the kernels use no atomics). Checks that raise are failures; tracebacks in
   ``accuracy_errors.log``.
3. ``tests.log``: the tests marked ``cuda`` (:data:`CUDA_TEST_FILES`), run compiled (``TRITON_INTERPRET=0``): among
   them a training step of every method under ``torch.cuda.set_sync_debug_mode("error")`` and the per-dot precision
   check (``tests/ops/test_tf32_emulation.py``: the kernels' fp32 ``tl.dot`` products within the contract of
   ``kernels/_launch.py: dot_precision`` and at the values their CPU emulation gives).
4. ``bench/GROUP/``: the CUDA cases of the benchmark suite, a group at a time (:data:`BENCH_GROUPS`), each with its
   pytest-benchmark JSON, ``benchmarks/report.py``'s report and both logs.

``summary.json`` lists the failures and what was not run. ``--device cpu`` runs section 2 alone, through the Triton
interpreter at small sizes: ``make test`` runs it that way so that this script keeps working on machines without a
GPU. That proves nothing about a GPU.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAIL_FACTOR = 20.0
"""A row fails when its error exceeds this multiple of the torch path's error (and the dtype's floor)."""
CUDA_TEST_FILES = ("tests/data/test_transfer.py", "tests/ops/test_attention_pool.py", "tests/train/test_host_sync.py",
                   "tests/ops/test_tf32_emulation.py")
"""The test files holding tests marked ``cuda`` (``tests/test_device_check.py`` checks that none is elsewhere);
named, so that collecting them imports only what they import."""
NEEDED_MODULES = ("numpy", "pytest", "pytest_benchmark", "zarr", "h5py", "yaml", "tqdm", "matplotlib", "sklearn")
"""What sections 3 and 4 import besides torch and triton (fastmil's dependencies and the test tools)."""


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the results (created)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cuda: the full run; cpu: the accuracy section through the Triton interpreter, small")
    parser.add_argument("--deadline", type=float, default=540.0,
                        help="seconds for the whole run; sections that do not fit are listed as not run")
    parser.add_argument("--no-bench", action="store_true", help="leave out section 4 (the benchmark cases)")
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

FLOOR = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
"""Errors below these never fail a row: ~4 units in the last place of fp16/bf16 (outputs and gradients are stored
in the input dtype), and for fp32 well above 3xTF32's ~1e-6."""


@dataclass(frozen=True)
class Sizes:
    """The ragged batch and widths of one run: GPU-sized, or small enough for the interpreter."""

    bags: tuple[int, ...]
    dim: int
    embed: int
    dtypes: tuple[torch.dtype, ...]


FULL = Sizes(bags=(1, 7, 129, 1000, 4096, 20_011), dim=259, embed=300,
             dtypes=(torch.float32, torch.float16, torch.bfloat16))
QUICK = Sizes(bags=(1, 7, 45), dim=40, embed=24, dtypes=(torch.float32, torch.float16, torch.bfloat16))


@dataclass
class Row:
    """One measured quantity of the Triton path on the device under test: mostly an output's largest error against
    the fp64 reference, beside the torch path's on the CPU (the yardstick); ``limit``, where given, is the bound a
    correct kernel cannot exceed (0 for exact contracts, a binomial bound for a random share)."""

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
        floor = FLOOR.get(getattr(torch, self.dtype, None), FLOOR[torch.float32])
        return self.triton > max(floor, FAIL_FACTOR * (self.torch_cpu or 0.0))


# ----------------------------------------------------------------------------------------------------------------
# running a case on a device, with gradients back on the CPU
# ----------------------------------------------------------------------------------------------------------------
def _leaves(tensors: list[torch.Tensor], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    return [t.detach().to(dtype).requires_grad_() for t, dtype in zip(tensors, dtypes)]


def _run(fn: Callable[..., tuple[torch.Tensor, ...]], inputs: list[torch.Tensor], weights: list[torch.Tensor],
         device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``fn(*inputs)`` on ``device`` (leaves on the CPU, moved differentiably), then the backward of
    ``sum_k <out_k, weights_k>`` in fp64 over the finite entries (an empty bag's log-sum-exp is -inf): the outputs
    and the inputs' gradients, as fp64 CPU tensors."""
    moved = [t.to(device) for t in inputs]
    outs = fn(*moved)
    loss = sum((torch.where(torch.isfinite(o), o, 0).double() * w.to(o.device)).sum() for o, w in zip(outs, weights))
    loss.backward()
    grads = [torch.zeros_like(t, dtype=torch.float64) if t.grad is None else t.grad.double() for t in inputs]
    return [o.detach().double().cpu() for o in outs], grads


def _finite_metric(metric: Callable) -> Callable:
    """``metric`` over the entries where actual and expected are not the same non-finite value (-inf == -inf is no
    error); any other non-finite entry is an infinite error."""
    def compare(actual: torch.Tensor, expected: torch.Tensor) -> float:
        same = actual == expected
        a, e = torch.where(same, 0.0, actual), torch.where(same, 0.0, expected)
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(e).all())):
            return math.inf
        return metric(a, e)

    compare.__name__ = metric.__name__
    return compare


def _compare(op: str, case: str, dtype: torch.dtype, names: list[str], metrics: list[Callable],
             fn_triton: Callable, fn_torch: Callable, fn_ref: Callable, inputs: list[torch.Tensor],
             weights: list[torch.Tensor], input_dtypes: list[torch.dtype], device: str) -> list[Row]:
    """Run the three paths on the same (rounded) inputs and return one row per output and per gradient, and one for
    the Triton path's run-to-run difference (its kernels use no atomics: two runs must agree bit for bit). The torch
    path runs on the CPU with the Triton path's input dtypes; the reference in fp64."""
    rounded = _leaves(inputs, input_dtypes)  # what every path sees
    triton_runs = [_run(fn_triton, _leaves(rounded, input_dtypes), weights, device) for _ in range(2)]
    out_c, grad_c = _run(fn_torch, _leaves(rounded, input_dtypes), weights, "cpu")
    out_r, grad_r = _run(fn_ref, _leaves(rounded, [torch.float64] * len(inputs)), weights, "cpu")
    first, second = ([*outs, *grads] for outs, grads in triton_runs)
    name = _dtype_name(dtype)
    rows = []
    for out, metric, t, c, r in zip(names, metrics, first, [*out_c, *grad_c], [*out_r, *grad_r]):
        checked = _finite_metric(metric)
        rows.append(Row(op, case, name, out, metric.__name__, checked(t, r), checked(c, r)))
    rerun = max(_finite_metric(absolute_error)(a, b) for a, b in zip(first, second))
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
    """With the log-sum-exp output (MHIM-MIL pools recycled tokens beside the instances through it); V and U are
    rounded to the dtype the Triton path multiplies them in (``score_weight_dtype``) before any path sees them."""
    from fastmil.kernels.gated_attention_pool import score_weight_dtype

    offsets = offsets_of(list(sizes.bags))
    n, n_bags, dim, hidden = int(offsets[-1]), len(sizes.bags), sizes.dim, 24
    bag = _bag_metric(offsets)
    for mask_kind in ("all-masked-bag", "sparse"):
        for dtype in sizes.dtypes:
            g = torch.Generator().manual_seed(2)
            h = torch.randn(n, dim, generator=g)
            gate = score_weight_dtype(dtype)
            params = [_rounded(torch.randn(hidden, dim, generator=g) / dim**0.5, gate),
                      torch.randn(hidden, generator=g) * 0.1,
                      _rounded(torch.randn(hidden, dim, generator=g) / dim**0.5, gate),
                      torch.randn(hidden, generator=g) * 0.1, torch.randn(1, hidden, generator=g) * 2,
                      torch.randn(1, generator=g)]
            mask = make_mask(list(sizes.bags), mask_kind, g)
            weights = [torch.randn(n_bags, dim, generator=g).double(), torch.randn(n, generator=g).double(),
                       torch.randn(n_bags, generator=g).double()]

            def run(backend, mask=mask):
                return lambda x, *p: gated_attention_pool(x, *p, offsets.to(x.device), mask.to(x.device),
                                                          backend=backend, return_lse=True)

            def reference(x, *p, mask=mask):
                pooled, attn = gated_attention_pool_reference(x, *p, offsets, mask)
                return pooled, attn, _reference_lse(x, *p, offsets, mask)

            names = ["pooled", "weights", "lse", "grad_h", "grad_v_weight", "grad_v_bias", "grad_u_weight",
                     "grad_u_bias", "grad_w_weight", "grad_w_bias"]
            metrics = [relative_error, bag, relative_error, bag] + [relative_error] * 6
            yield from _compare(
                "gated_attention_pool", f"mask={mask_kind}, lse", dtype, names, metrics, run("triton"), run("torch"),
                reference, [h, *params], weights, [dtype] + [torch.float32] * len(params), device)


def _reference_lse(h, v_w, v_b, u_w, u_b, w_w, w_b, offsets, mask):
    """Per-bag log-sum-exp of the gated scores over unmasked rows (-inf for a bag with none), fp64, differentiable."""
    scores = (torch.tanh(h @ v_w.T + v_b) * torch.sigmoid(h @ u_w.T + u_b)) @ w_w[0] + w_b
    scores = torch.where(mask, scores, float("-inf"))
    bounds = offsets.tolist()
    return torch.stack([torch.logsumexp(scores[lo:hi], 0) for lo, hi in zip(bounds[:-1], bounds[1:])])


def _rounded(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t``'s values rounded to ``dtype``, kept in ``t``'s dtype: what a path that rounds them would see."""
    return t.to(dtype).to(t.dtype)


def _grid_batch(sizes: Sizes, g: torch.Generator) -> torch.Tensor:
    """The stencil table (radius 2) of patch coordinates on a 256-pixel lattice with random holes, per bag."""
    coords, offsets = [], [0]
    for size in sizes.bags:
        side = math.isqrt(2 * size) + 2
        cells = torch.randperm(side * side, generator=g)[:size]
        coords.append(torch.stack([cells % side, cells // side], 1) * 256)
        offsets.append(offsets[-1] + size)
    return grid_neighbours(torch.cat(coords), torch.tensor(offsets), radius=2, step=256, backend="torch")


def check_graph_attention(sizes: Sizes, device: str) -> Iterator[Row]:
    """The scores are rounded to ``x``'s dtype first (the Triton path takes them in it)."""
    g = torch.Generator().manual_seed(3)
    nbr = _grid_batch(sizes, g)
    n, heads, channels = nbr.shape[0], 4, max(8, sizes.dim // 8)
    cases = [(dtype, True) for dtype in sizes.dtypes] + [(torch.float32, False)]
    for dtype, self_loop in cases:
        x = torch.randn(n, heads, channels, generator=g)
        src = _rounded(torch.randn(n, heads, generator=g), dtype)
        dst = _rounded(torch.randn(n, heads, generator=g), dtype)
        weights = [torch.randn(n, heads, channels, generator=g).double()]

        def run(backend, self_loop=self_loop):
            return lambda xx, s, d: (graph_attention(xx, nbr.to(xx.device), s, d, self_loop=self_loop,
                                                     backend=backend),)

        yield from _compare(
            "graph_attention", f"radius=2, self_loop={self_loop}", dtype, ["out", "grad_x", "grad_src", "grad_dst"],
            [relative_error] * 4, run("triton"), run("torch"),
            lambda xx, s, d, self_loop=self_loop: (graph_attention_reference(xx, nbr, s, d, self_loop=self_loop),),
            [x, src, dst], weights, [dtype, torch.float32, torch.float32], device)


def _embed_case(sizes: Sizes, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``x [N, D]``, ``weight [E, D]`` and ``bias [E]`` of the embed block."""
    x = torch.randn(sum(sizes.bags), sizes.dim, generator=g)
    weight = torch.randn(sizes.embed, sizes.dim, generator=g) / sizes.dim**0.5
    return x, weight, torch.randn(sizes.embed, generator=g)


def check_linear_relu_dropout(sizes: Sizes, device: str) -> Iterator[Row]:
    n = sum(sizes.bags)
    for dtype in sizes.dtypes:
        g = torch.Generator().manual_seed(4)
        x, weight, bias = _embed_case(sizes, g)
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
    if device == "cuda":  # fp32 features and weights under bf16 autocast: converted in registers, not copied
        x, weight, bias = _embed_case(sizes, torch.Generator().manual_seed(5))
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            y = linear_relu_dropout(x.cuda(), weight.cuda(), bias.cuda(), 0.25, training=False, backend="triton")
        rounded = [t.to(torch.bfloat16).double() for t in (x, weight, bias)]
        expected = torch.relu(rounded[0] @ rounded[1].T + rounded[2])
        yield Row("linear_relu_dropout", "eval, bf16 autocast of fp32 inputs", "bfloat16", "y", "relative_error",
                  relative_error(y.double().cpu(), expected), limit=4 * torch.finfo(torch.bfloat16).eps)


def check_saliency_mask(sizes: Sizes, device: str) -> Iterator[Row]:
    """Exact contract: the Triton sets equal the torch path's (which the unit tests check against a sort-based
    reference), ties and an all-masked bag included."""
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
class Clock:
    """Seconds left of the run's deadline."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def environment() -> dict:
    import triton

    release = ".".join(triton.__version__.split(".")[:2])
    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "triton_checked_by_make_aot": release in CHECKED_TRITON, "cuda": torch.cuda.is_available(),
           "missing_modules": [m for m in NEEDED_MODULES if importlib.util.find_spec(m) is None]}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=list(torch.cuda.get_device_capability(0)),
                   memory_gib=round(props.total_memory / 2**30, 1), tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    return env


def accuracy(sizes: Sizes, device: str, out: Path, clock: Clock, not_run: list[str]) -> list[Row]:
    rows: list[Row] = []
    for check in CHECKS:
        op = check.__name__.removeprefix("check_")
        if clock.left() < 20:
            not_run.append(f"accuracy of {op}: past the deadline")
            continue
        start = time.perf_counter()
        try:
            rows.extend(check(sizes, device))
        except Exception as exc:  # a failed row, its traceback logged; the other ops still run
            rows.append(Row(op, "raised", "-", f"{type(exc).__name__}: {exc}", "-", math.inf))
            with (out / "accuracy_errors.log").open("a") as log:
                log.write(f"--- {op}\n{traceback.format_exc()}\n")
        print(f"  {op}: {time.perf_counter() - start:.1f} s", flush=True)
        _write_accuracy(rows, out)
    return rows


def _write_accuracy(rows: list[Row], out: Path) -> None:
    (out / "accuracy.json").write_text(json.dumps([asdict(r) | {"failed": r.failed} for r in rows], indent=1))
    lines = ["| op | case | dtype | output | metric | triton | torch (CPU) | limit | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.op} | {r.case} | {r.dtype} | {r.output} | {r.metric} | {r.triton:.3g} | "
                     f"{_fmt(r.torch_cpu)} | {_fmt(r.limit)} | {'FAILED' if r.failed else ''} |")
    (out / "accuracy.md").write_text("\n".join(lines) + "\n")


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3g}"


def _subprocess(cmd: list[str], log: Path, env: dict, timeout: float) -> int:
    """``cmd`` in the repository in a session of its own, its output in ``log`` (its tail printed); past
    ``timeout`` seconds the whole session is killed (memory probes that a benchmark started included): rc 124."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
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
stopped by the deadline keeps the groups before it (pytest-benchmark writes its JSON at the end of a run). Every
group also runs the GEMM-rate case, the yardstick of its report. The memory cases (a fresh process each) run at the
largest sizes only."""


def benchmarks(out: Path, env: dict, clock: Clock, failures: list[str], not_run: list[str]) -> None:
    for name, files, select in BENCH_GROUPS:
        if clock.left() < 60:
            not_run.append(f"benchmarks {name}: past the deadline")
            continue
        folder = out / "bench" / name
        folder.mkdir(parents=True, exist_ok=True)
        paths = [f"benchmarks/{f}" for f in files.split()] + ["benchmarks/test_bench_gemm.py"]
        code = _subprocess([sys.executable, "-m", "pytest", *paths, "-k", f"({select}) or gemm_rate[cuda]", "-q",
                            "-o", "addopts=", "--benchmark-only", f"--benchmark-json={folder / 'bench.json'}",
                            "-p", "no:cacheprovider"], folder / "pytest.log", env, clock.left())
        if code == 124:
            not_run.append(f"benchmarks {name}: stopped at the deadline ({folder / 'pytest.log'})")
        elif code != 0:
            failures.append(f"benchmarks {name}: pytest exit {code} ({folder / 'pytest.log'})")
        if (folder / "bench.json").exists():
            report = _subprocess([sys.executable, str(REPO / "benchmarks" / "report.py"), str(folder / "bench.json")],
                                 folder / "report.log", env, max(30.0, clock.left()))
            if report != 0:
                failures.append(f"benchmarks {name}: report.py exit {report} ({folder / 'report.log'})")


def main(args: argparse.Namespace) -> int:
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("device_check: --device cuda needs a CUDA GPU (torch.cuda.is_available() is False); "
              "--device cpu checks the script itself through the interpreter", file=sys.stderr)
        return 2
    clock = Clock(args.deadline)
    torch.backends.cuda.matmul.allow_tf32 = False  # torch's default, stated: fp32 tl.dot then runs as 3xTF32
    env = environment()
    (out / "env.json").write_text(json.dumps(env, indent=1))
    print(json.dumps(env), flush=True)
    failures: list[str] = []
    not_run: list[str] = []

    print("accuracy of the Triton ops against fp64 references:", flush=True)
    rows = accuracy(QUICK if args.device == "cpu" else FULL, args.device, out, clock, not_run)
    failures += [f"accuracy: {r.op} {r.case} {r.dtype} {r.output}: {r.triton:.3g}" for r in rows if r.failed]
    print((out / "accuracy.md").read_text(), flush=True)

    if args.device == "cuda":
        child_env = dict(os.environ, TRITON_INTERPRET="0", PYTHONUNBUFFERED="1")
        print("the tests that need CUDA, compiled:", flush=True)
        code = _subprocess([sys.executable, "-m", "pytest", *CUDA_TEST_FILES, "-m", "cuda", "-q", "-p",
                            "no:cacheprovider"], out / "tests.log", child_env, clock.left())
        if code == 124:
            not_run.append("pytest -m cuda: stopped at the deadline (tests.log)")
        elif code != 0:
            failures.append(f"pytest -m cuda: exit {code} (tests.log)")
        if args.no_bench:
            not_run.append("benchmarks: --no-bench")
        else:
            print("the CUDA benchmark cases:", flush=True)
            benchmarks(out, child_env, clock, failures, not_run)
    (out / "summary.json").write_text(json.dumps({"failures": failures, "not_run": not_run}, indent=1))
    for line in not_run:
        print(f"NOT RUN {line}", file=sys.stderr)
    for line in failures:
        print(f"FAILED {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(_ARGS))
