"""The ahead-of-time compile checker (fastmil.aot): discovery, runtime-identical specialisation, one real build.

``make aot`` itself (every specialisation, sm_80 + sm_90, each checked triton release) runs in CI after the tests.
"""
import os
import subprocess
import sys
import textwrap

import pytest

from fastmil import aot

_NO_INTERPRETER = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run_clean(code: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter without TRITON_INTERPRET (the compiler, not the interpreter)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**_NO_INTERPRETER, "TRITON_DEFAULT_FP_FUSION": "1"}, timeout=timeout, check=False)


def test_every_kernel_of_every_module_is_discovered_and_covered():
    proc = _run_clean("""
        import importlib, pkgutil
        import fastmil.kernels as pkg
        from fastmil import aot
        names = sorted(m.__name__ for m in aot.kernel_modules())
        every = [importlib.import_module(f"fastmil.kernels.{i.name}") for i in pkgutil.iter_modules(pkg.__path__)]
        jitted = set().union(*(aot.jit_kernels(m) for m in every))
        covered = {s.kernel for s in aot.collect_specialisations()}
        print(names)
        print(sorted(jitted - covered), len(jitted))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names, uncovered = proc.stdout.strip().splitlines()[-2:]
    assert "fastmil.kernels.attention_pool" in names and "fastmil.kernels.gated_attention_pool" in names
    assert uncovered.startswith("[] ") and int(uncovered.split()[-1]) >= 8, uncovered


def test_runtime_launches_are_exactly_the_checked_specialisations():
    """Run the ops of all five kernel families (attention_pool and gated_attention_pool with the shared tile
    merge/normalise kernels, linear_relu_dropout, graph_attention, saliency_mask), forward and backward, through
    their real launch code on many argument shapes (dtypes, heads, hidden sizes, embedding widths, masks,
    strided/misaligned/transposed views, a bag of one row, row counts equal to 1, divisible by 16 and not, grads of
    the weights or not, dropout on and off, self loops on and off, int32/int64 neighbour tables, mixed score
    dtypes) with the launches recorded instead of run (an empty grid is not launched, as in ``Launch.__call__``),
    and derive each one's specialisation with Triton's binder (what the GPU runtime would compile): every one
    must be among those ``make aot`` compiles, and every family must have been launched."""
    proc = _run_clean("""
        import itertools, torch
        import fastmil.ops._backend as backend
        from fastmil import aot
        from fastmil.kernels._launch import Launch
        from fastmil.ops import attention_pool, gated_attention_pool, linear_relu_dropout
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        seen = []
        # record instead of running (no GPU here); an empty grid is never launched (Launch.__call__)
        Launch.__call__ = lambda self: seen.append(self) if min(self.grid, default=0) > 0 else None
        backend.resolve_backend = lambda *a, **k: "triton"  # the GPU dispatch, on CPU tensors
        import importlib
        from fastmil.kernels.graph_attention import AOT_SHAPES
        from fastmil.ops import graph_attention, saliency_mask
        for name in ("attention_pool", "gated_attention_pool", "linear_relu_dropout", "graph_attention",
                     "saliency_mask"):
            name = f"fastmil.ops.{name}"
            importlib.import_module(name).resolve_backend = backend.resolve_backend

        def views(n, d, dtype):
            x = torch.randn(n, d).to(dtype)
            yield x
            yield torch.randn(n, 2 * d + 16).to(dtype)[:, :d]
            yield torch.randn(n, d + 1).to(dtype)[:, 1:]
            yield torch.randn(d, n).to(dtype).T
        for allow_tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
            for dtype, d, sizes, masked in itertools.product(
                (torch.float32, torch.float16, torch.bfloat16), (1024, 768, 40, 2), ([1], [5, 300, 33], [7, 41]),
                (False, True)):
                if masked and sum(sizes) % 16 == 0:  # 48 rows: the divisible row-count class, unmasked only
                    continue
                n = sum(sizes)
                offsets = torch.tensor([0, *itertools.accumulate(sizes)])
                mask = (torch.rand(2 * n) > 0.3)[::2] if masked else None
                for h in views(n, d, dtype):
                    for heads in (1, 3, 16, 20, 32):
                        s = torch.randn(n, heads, dtype=dtype, requires_grad=True)
                        v = h.detach().requires_grad_()
                        pooled, w = attention_pool(s if heads > 1 else s[:, 0], v, offsets, mask)
                        (pooled.sum() + w.sum()).backward()
                    for hidden in (128, 100, 17, 256):
                        params = [torch.randn(hidden, d), torch.randn(hidden), torch.randn(hidden, d),
                                  torch.randn(hidden), torch.randn(1, hidden), torch.randn(1)]
                        params = [p.requires_grad_() for p in params]
                        x = h.detach().requires_grad_()
                        pooled, w = gated_attention_pool(x, *params, offsets, mask)
                        (pooled.sum() + (w * 2).sum()).backward()
                    if masked:
                        continue
                    for out_dim in (512, 45, 1):
                        weight = torch.randn(out_dim, d).to(dtype).requires_grad_()
                        bias = torch.randn(out_dim).to(dtype).requires_grad_()
                        for b, (training, p) in itertools.product((bias, None), ((True, 0.25), (True, 0.1),
                                                                                   (False, 0.25))):
                            linear_relu_dropout(h.detach(), weight, b, p, training).float().sum().backward()
        # graph_attention: the model shapes make aot checks (heads, channels and K are constexprs), every row
        # count class (N = 1 is a constant, N % 16 == 0 gets a hint, any other N neither; N = 0 launches
        # nothing), both table dtypes, scores in another dtype, views the op copies, with and without grad x
        for dtype, (heads, c, k), n in itertools.product(
                (torch.float32, torch.float16, torch.bfloat16), AOT_SHAPES, (1, 37, 64, 0)):
            nbr = torch.randint(-1, max(n, 1), (n, k)) if n else torch.zeros(0, k, dtype=torch.int64)
            variants = [(torch.randn(n, heads, c).to(dtype), nbr, dtype, True, True),
                        (torch.randn(n, heads, c + 3).to(dtype)[:, :, 1:c + 1], nbr.int(), torch.float32,
                         False, True),
                        (torch.randn(n, heads, c).to(dtype), nbr, dtype, False, False)]
            for x, table, sdt, self_loop, grad_x in variants:
                x = x.requires_grad_(grad_x)
                src = torch.randn(heads, n).to(sdt).T.requires_grad_()  # a transposed view
                dst = torch.randn(n, heads).to(sdt).requires_grad_()
                out = graph_attention(x, table, src, dst, 0.2, self_loop)
                out.float().sum().backward()  # a broadcast (stride 0) gradient
                graph_attention(x, table, src, dst, 0.1, self_loop).backward(torch.randn_like(out))
        # saliency_mask: score and random keys, with and without a participation mask, bags of one row and a
        # ragged batch whose bags span several tiles, scores in each dtype and as a strided view
        for dtype, sizes, masked in itertools.product(
                (torch.float32, torch.float16, torch.bfloat16), ([1], [5, 1500, 33], [2048, 0, 17]),
                (False, True)):
            n = sum(sizes)
            offsets = torch.tensor([0, *itertools.accumulate(sizes)])
            mask = (torch.rand(2 * n) > 0.3)[::2] if masked else None
            for scores in (torch.randn(n).to(dtype), torch.randn(2 * n).to(dtype)[::2]):
                for high, rand in ((0.1, 0.5), (0.0, 0.3), (0.5, 0.0)):
                    saliency_mask(scores, offsets, high, rand, seed=3, mask=mask, offsets_cpu=offsets)
        torch.backends.cuda.matmul.allow_tf32 = False
        be = make_backend(GPUTarget("cuda", 90, 32))
        runtime = {aot.specialise(launch, be) for launch in seen}
        checked = set(aot.collect_specialisations())
        missing = runtime - checked
        print(len(seen), len(runtime), len(missing))
        print(" ".join(sorted({launch.name for launch in seen})))
        for spec in sorted(missing, key=lambda s: (s.kernel, s.label))[:20]:
            print(spec.kernel, spec.label)
    """, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    launches, distinct, missing = map(int, lines[0].split())
    assert launches > 1000 and distinct > 100, lines[0]
    launched = set(lines[1].split())
    for kernel in ("pool_fwd_tile_kernel", "gated_fwd_tile_kernel", "merge_tiles_kernel", "normalize_weights_kernel",
                   "linear_relu_dropout_kernel", "gat_fwd_kernel", "gat_edge_kernel", "gat_pull_kernel",
                   "radix_hist_kernel", "radix_select_kernel", "radix_mark_kernel"):
        assert kernel in launched, (kernel, lines[1])
    assert missing == 0, "\n".join(lines)


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


def test_compiles_a_kernel_family_for_sm80_without_spills(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastmil.aot", "--kernel", "merge_tiles", "--targets", "80", "--jobs", "1",
         "--cache", str(tmp_path / "cache.json"), "--verbose"],
        capture_output=True, text=True, env=_NO_INTERPRETER, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "merge_tiles_kernel" in proc.stdout and "sm_80" in proc.stdout and "0 with problems" in proc.stdout
    # H = 1 (single-head pooling) is compiled as the constant Triton makes of it at run time
    assert "H=1" in proc.stdout
    again = subprocess.run(
        [sys.executable, "-m", "fastmil.aot", "--kernel", "merge_tiles", "--targets", "80", "--jobs", "1",
         "--cache", str(tmp_path / "cache.json")],
        capture_output=True, text=True, env=_NO_INTERPRETER, timeout=300, check=False,
    )
    assert again.returncode == 0 and "(0 to compile," in again.stdout, again.stdout[-1000:]


def test_declared_triton_range_matches_the_checked_releases():
    """pyproject's triton requirement, the Makefile's AOT matrix and the runtime warning agree."""
    import re
    from pathlib import Path

    from fastmil.kernels.limits import CHECKED_TRITON

    repo = Path(__file__).resolve().parents[1]
    pyproject = (repo / "pyproject.toml").read_text()
    requirement = re.search(r'"triton([^";]*)', pyproject).group(1).replace(" ", "")
    makefile = (repo / "Makefile").read_text()
    matrix = re.search(r"^AOT_TRITON \?= (.+)$", makefile, re.M).group(1).split()
    assert sorted(".".join(v.split(".")[:2]) for v in matrix) == sorted(CHECKED_TRITON)
    low, high = min(CHECKED_TRITON, key=lambda v: tuple(map(int, v.split(".")))), max(
        CHECKED_TRITON, key=lambda v: tuple(map(int, v.split("."))))
    major, minor = map(int, high.split("."))
    assert requirement == f">={low},<{major}.{minor + 1}", requirement
