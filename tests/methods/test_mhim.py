"""MHIM-MIL through the generic trainer: the teacher EMA, the masks, the loss terms, teacher initialisation from a
finished run, a bit-for-bit resume of student, teacher and recycle queries, and learning."""
from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastmil.bags import Bags
from fastmil.checkpoint import load_checkpoint
from fastmil.cli import main
from fastmil.data import SynthConfig, synthesize_store
from fastmil.methods import MHIM, StepContext, build_method, method_config
from fastmil.methods.ema import ema_update_
from fastmil.methods.mhim import teacher_momentum
from fastmil.nn import model_config
from fastmil.train import TrainConfig, fit, load_method, predict
from fastmil.train.step import Stepper
from tests.tolerance import check, rounding_bound

REPO = Path(__file__).resolve().parents[2]
DATA = SynthConfig(n_slides=60, dim=32, median_instances=300, size_sigma=0.3, tumour_fraction_min=0.02,
                   tumour_fraction_max=0.05, seed=3)
FAMILY = "methods.mhim"


def _method(**method) -> MHIM:
    torch.manual_seed(0)
    return build_method(method_config({"name": "mhim", **method}), model_config({"embed_dim": 16, "attn_dim": 8}), 6,
                        2)


def _bags(seed=0) -> Bags:
    g = torch.Generator().manual_seed(seed)
    return Bags.from_list([torch.randn(n, 6, generator=g) for n in (40, 1, 70)], labels=[1, 0, 1])


def _ctx(step=0) -> StepContext:
    return StepContext(epoch=0, step=step, steps_per_epoch=10, epochs=2, seed=5, class_weight=None)


def test_teacher_ema_is_the_formula_after_each_optimiser_step():
    method = _method(teacher_momentum=0.9)
    stepper = Stepper(method, TrainConfig().optim, "none", torch.device("cpu"))
    teacher_before = [p.clone() for p in method.teacher.parameters()]
    stepper.step(_bags(), _ctx())
    for t_old, t_new, s in zip(teacher_before, method.teacher.parameters(), method.model.parameters()):
        assert torch.equal(t_new, 0.9 * t_old + (1 - 0.9) * s)  # bitwise: the formula in the parameters' dtype
    assert all(not p.requires_grad for p in method.teacher.parameters())
    trained = {id(p) for p in stepper.params}
    assert trained == {id(p) for p in [*method.model.parameters(), *method.recycle.parameters()]}


def test_a_skipped_fp16_step_moves_neither_teacher_nor_queries_and_the_next_step_does():
    """fp16 loss scaling skips a step whose gradients overflow; the stepper tells the method on the device
    (``ctx.step_applied``, no host read of the scale), and the EMA teacher and the recycle queries stay bit for bit.
    The next step applies the EMA formula exactly. (The CPU's GradScaler runs the same logic as CUDA's.)"""
    method = _method(teacher_momentum=0.9)
    stepper = Stepper(method, TrainConfig().optim, "fp16", torch.device("cpu"))
    teacher = [p.clone() for p in method.teacher.parameters()]
    student = [p.clone() for p in method.model.parameters()]
    queries = method.recycle.queries.clone()
    hook = next(method.model.parameters()).register_hook(lambda g: g * float("inf"))
    stepper.step(_bags(), _ctx())
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(student, method.model.parameters()))  # the step was skipped
    assert all(torch.equal(a, b) for a, b in zip(teacher, method.teacher.parameters()))
    assert torch.equal(queries, method.recycle.queries)
    stepper.step(_bags(), _ctx(1))
    assert not torch.equal(queries, method.recycle.queries)
    for t_old, t_new, s in zip(teacher, method.teacher.parameters(), method.model.parameters()):
        assert torch.equal(t_new, 0.9 * t_old + (1 - 0.9) * s)


def test_ema_with_a_device_flag_is_bitwise_the_scalar_formula_or_nothing():
    g = torch.Generator().manual_seed(1)
    target, source = [torch.randn(7, generator=g)], [torch.randn(7, generator=g)]
    for momentum in (0.9, 0.9997, 0.3):
        plain, flagged, held = ([t.clone() for t in target] for _ in range(3))
        ema_update_(plain, source, momentum)
        ema_update_(flagged, source, momentum, torch.tensor(True))
        ema_update_(held, source, momentum, torch.tensor(False))
        assert torch.equal(flagged[0], plain[0]) and torch.equal(held[0], target[0])


def test_momentum_schedules():
    assert teacher_momentum(0.9997, "constant", 0.7) == 0.9997
    assert teacher_momentum(0.99, "cosine", 0.0) == pytest.approx(0.99)
    assert teacher_momentum(0.99, "cosine", 0.5) == pytest.approx(0.995)
    assert teacher_momentum(0.99, "cosine", 1.0) == pytest.approx(1.0)


def test_training_step_masks_scores_and_losses():
    """The student pools over kept instances only (salient and random ones get no attention), the recycle
    tokens come from the random ones, the terms are what the docstring says, and the teacher has no dropout."""
    method = _method(high_ratio=0.1, random_ratio=0.5)
    method.model.embed.dropout = 0.5  # dropout that only the student may apply
    method.teacher.embed.dropout = 0.5
    method.train()
    seen = {}
    original = method.model.aggregate

    def spy(h, offsets, mask=None, **kwargs):
        out = original(h, offsets, mask, **kwargs)
        seen.update(mask=mask, out=out, **kwargs)
        return out

    method.model.aggregate = spy
    bags = _bags(1)
    step = method.training_step(bags, _ctx())
    keep, out = seen["mask"], seen["out"]
    sizes = [40, 1, 70]
    n_salient = sum(math.ceil(0.1 * n) for n in sizes)
    n_random = sum(math.floor(0.5 * (n - math.ceil(0.1 * n))) for n in sizes)
    assert int((~keep).sum()) == n_salient + n_random
    assert torch.all(out.attention[~keep] == 0)
    assert step.terms["salient_frac"] == pytest.approx(n_salient / 111) and step.terms["random_frac"] == pytest.approx(
        n_random / 111)
    with torch.no_grad():
        method.teacher.eval()
        z_t = method.teacher.forward_all(bags).bag_embedding
        assert torch.equal(z_t, method.teacher.forward_all(bags).bag_embedding)  # eval: no dropout in the teacher
    ce = F.cross_entropy(out.logits, bags.labels)
    consistency = -(torch.softmax(z_t / 0.1, -1) * F.log_softmax(out.bag_embedding / 1.0, -1)).sum(-1).mean()
    # fp32, both sides computed from the same logits and bag embeddings (twice the bound). Cross-entropy: the
    # log-sum-exp over 2 classes (+ 4) less the label's logit, the mean over 3 bags (+ 1); that difference cancels:
    # the condition is sum_b (|lse_b| + |x_b,y|) / sum_b ce_b
    with torch.no_grad():
        lse, picked = torch.logsumexp(out.logits, -1), out.logits.gather(1, bags.labels[:, None])[:, 0]
        ce_condition = float((lse.abs() + picked.abs()).sum() / (lse - picked).sum())
        # consistency: the teacher's softmax over E = 16 (+ 3), the student's log-softmax over 16 (+ 5), the
        # product, the sum over 16, the mean over 3 (+ 1); log q = z - lse cancels: the condition is
        # sum p (|z| + |lse|) / sum p (-log q), the terms all >= 0 otherwise
        p, z = torch.softmax(z_t / 0.1, -1), out.bag_embedding
        z_lse = torch.logsumexp(z, -1, keepdim=True)
        consistency_condition = float((p * (z.abs() + z_lse.abs())).sum() / (p * (z_lse - z)).sum())
    ce_depth, consistency_depth = 2 + 4 + 1 + 3 + 1, 16 + 3 + 16 + 5 + 1 + 16 + 3 + 1
    for name, got, want, depth, condition in (
            ("ce", step.terms["ce"], ce, ce_depth, ce_condition),
            ("consistency", step.terms["consistency"], consistency, consistency_depth, consistency_condition),
            # the loss: the two terms (both >= 0: the sum's relative error is at most the larger of theirs) and
            # its product and sum (+ 2)
            ("loss", step.loss, ce + 0.5 * consistency, ce_depth + consistency_depth + 2,
             max(ce_condition, consistency_condition))):
        error = float((got - want).detach().abs() / want.detach().abs())
        check(error, 2 * rounding_bound(depth, torch.float32, condition), FAMILY, f"step term {name}")
    assert seen["tokens"].shape == (3, 5, 16) and bool((seen["tokens"] >= 0).all())  # activated like instances
    assert seen["token_valid"].tolist() == [True, False, True]  # the bag of one recycles nothing


def test_the_sparse_gradient_of_the_kept_rows_changes_no_gradient(monkeypatch):
    """With the recycle network on, the student's pooling returns the gradient of its kept rows as a sparse tensor
    (the recycle network's gradient of every row is dense); each trained parameter's gradient is bitwise the one
    of the dense path, and without recycling the pooling is not asked for it."""
    import fastmil.nn.attention as attention

    asked, made = [], []
    fused = attention.gated_attention_pool
    monkeypatch.setattr(attention, "gated_attention_pool",
                        lambda *a, **k: asked.append(k.get("sparse_grad", False)) or fused(*a, **k))
    sparse_tensor = torch.sparse_coo_tensor
    monkeypatch.setattr(torch, "sparse_coo_tensor", lambda *a, **k: made.append(1) or sparse_tensor(*a, **k))

    def gradients(sparse: bool, **config):
        method = _method(high_ratio=0.1, random_ratio=0.8, **config)
        method.train()
        if not sparse:
            aggregate = method.model.aggregate
            method.model.aggregate = lambda *a, **k: aggregate(*a, **{**k, "sparse_grad": False})
        method.training_step(_bags(2), _ctx()).loss.backward()
        return [p.grad for p in method.trainable_parameters()]

    sparse = gradients(True)
    assert len(made) == 1  # the student's kept rows were compacted: its gradient really was sparse
    dense = gradients(False)
    assert len(made) == 1
    assert asked == [False, True, False, False]  # teacher, student; teacher, student
    assert len(sparse) == len(dense) and sum(g is not None for g in sparse) >= len(sparse) - 1  # k_proj.bias: none
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(sparse, dense))
    gradients(True, recycle_tokens=0)
    assert asked[-1] is False


def test_teacher_init_from_a_finished_plain_run(tmp_path):
    store = synthesize_store(SynthConfig(n_slides=12, dim=6, median_instances=40, min_instances=16, seed=2),
                             tmp_path / "store", progress=False)
    plain = TrainConfig.from_dict(model={"embed_dim": 16, "attn_dim": 8}, optim={"epochs": 1},
                                  data={"test_fraction": 0.0})
    fit(store, tmp_path / "plain", plain, progress=False)
    saved = load_checkpoint(tmp_path / "plain" / "best.pt")["method_state"]
    best = {k.removeprefix("model."): v for k, v in saved.items()}
    method = _method(teacher_init=str(tmp_path / "plain"))
    for name, value in method.teacher.state_dict().items():
        assert torch.equal(value, best[name]), name
    assert all(torch.equal(v, best[k]) for k, v in method.model.state_dict().items())  # student_init: default on
    method = _method(teacher_init=str(tmp_path / "plain"), student_init=False)
    assert not torch.equal(method.model.classifier.weight, best["classifier.weight"])
    with pytest.raises(ValueError, match="teacher_init: .* was trained with model"):
        build_method(method_config({"name": "mhim", "teacher_init": str(tmp_path / "plain")}),
                     model_config({"embed_dim": 32, "attn_dim": 8}), 6, 2)


def test_mhim_needs_a_backbone_with_the_mhim_methods():
    from fastmil.nn import ABMIL

    class Bare(torch.nn.Module):
        embedding_dim = 4

    with pytest.raises(TypeError, match="needs a backbone with .* lacks embed_bags"):
        MHIM(Bare(), ABMIL(4, 4, 2), MHIM.Config())


_KILL = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import torch
    from tests.methods.test_mhim import SMALL_CFG
    from fastmil.train import TrainConfig, fit
    torch.set_num_threads({threads})  # the test process's: the thread count decides torch's reduction order
    def kill(epoch, step, loss):
        if epoch == 1 and step == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    fit(sys.argv[1], sys.argv[2], TrainConfig.from_dict(SMALL_CFG), progress=False, step_callback=kill)
""")

SMALL = SynthConfig(n_slides=16, dim=8, median_instances=60, min_instances=16, size_sigma=0.2, seed=1)
SMALL_CFG = {"model": {"embed_dim": 16, "attn_dim": 8}, "method": {"name": "mhim", "teacher_momentum": 0.9},
             "optim": {"epochs": 3, "lr": 1e-3}, "run": {"seed": 7},
             "data": {"val_fraction": 0.25, "test_fraction": 0.0}}


def test_resume_after_sigkill_restores_student_teacher_and_queries_bit_for_bit(tmp_path):
    store = synthesize_store(SMALL, tmp_path / "store", progress=False)
    full = fit(store, tmp_path / "full", TrainConfig.from_dict(SMALL_CFG), progress=False)
    # bitwise equality holds because the killed run's first epoch runs the same kernels in the same order as the
    # uninterrupted run's: same code path (MKL_CBWR, ATEN_CPU_CAPABILITY come with the environment), same threads
    script = _KILL.format(repo=str(REPO), threads=torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "store"), str(tmp_path / "killed")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert load_checkpoint(tmp_path / "killed" / "last.pt")["train_state"]["epochs_done"] == 1
    resumed = fit(store, tmp_path / "killed", TrainConfig.from_dict(SMALL_CFG), resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "last.pt")["method_state"]
    b = load_checkpoint(tmp_path / "killed" / "last.pt")["method_state"]
    assert {"recycle.queries", "teacher.classifier.weight", "model.classifier.weight"} <= set(a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["train"] for r in resumed.history] == [r["train"] for r in full.history]


def test_two_stage_recipe_learns_and_evaluates_and_predicts_from_the_cli(tmp_path):
    """The README's recipe: a plain run, then MHIM with its teacher (and student) initialised from that run's best
    model. It learns the needle, logs its terms, and eval/predict (heatmaps) work like for any run."""
    store = synthesize_store(DATA, tmp_path / "store", progress=False)
    common = ["--store", str(store.path), "-q", "optim.lr=1e-3", "model.embed_dim=128", "model.attn_dim=64",
              "model.dropout=0.1"]
    assert main(["train", "--out", str(tmp_path / "plain"), "--epochs", "8", *common]) == 0
    assert main(["train", "--out", str(tmp_path / "mhim"), "--epochs", "4", *common, "--method", "mhim",
                 f"method.teacher_init={tmp_path / 'plain'}"]) == 0
    method, cfg, _ = load_method(tmp_path / "mhim", store)
    assert isinstance(method, MHIM) and cfg.method.teacher_init == str(tmp_path / "plain")
    metrics = load_json(tmp_path / "mhim" / "metrics.json")
    assert metrics["test"]["auc"] >= 0.9, metrics
    history = load_json(tmp_path / "mhim" / "history.json")
    assert {"ce", "consistency", "salient_frac", "random_frac", "keep_frac"} <= set(history[-1]["train"])
    out = predict(tmp_path / "mhim", store, tmp_path / "pred", store.slide_ids[:2], progress=False)
    assert (out / "heatmaps" / f"{store.slide_ids[0]}.png").is_file()
    assert main(["eval", "--run", str(tmp_path / "mhim"), "--store", str(store.path), "-q"]) == 0


def load_json(path):
    import json

    return json.loads(Path(path).read_text())
