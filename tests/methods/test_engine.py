"""The method API and the generic trainer: a toy method defined only here (an EMA teacher plus an extra logged
loss term) trains through the unchanged ``fit``, logs its terms per epoch, and resumes bit-for-bit after a kill."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastmil._config import ConfigError
from fastmil.bags import Bags
from fastmil.checkpoint import load_checkpoint
from fastmil.data import SynthConfig, synthesize_store
from fastmil.methods import (
    METHODS,
    Method,
    StepContext,
    StepOutput,
    build_method,
    ema_update_,
    get_method,
    method_config,
    register_method,
)
from fastmil.nn import build_model, model_config
from fastmil.train import TrainConfig, fit, load_method
from tests.tolerance import check, rounding_bound

REPO = Path(__file__).resolve().parents[2]


@register_method("toy-ema")
class ToyEMA(Method):
    """Student + EMA teacher; loss = CE + weight * ||z_student - z_teacher||^2 (logged as ``consistency``)."""

    @dataclass
    class Config:
        name: str = "toy-ema"
        momentum: float = 0.9
        weight: float = 0.5

    def __init__(self, model, teacher, config) -> None:
        super().__init__(model, config)
        self.teacher = teacher.requires_grad_(False)

    @classmethod
    def from_config(cls, config, model_cfg, in_dim, n_classes):
        student = build_model(model_cfg, in_dim, n_classes)
        teacher = build_model(model_cfg, in_dim, n_classes)
        teacher.load_state_dict(student.state_dict())
        return cls(student, teacher, config)

    def training_step(self, bags: Bags, ctx: StepContext) -> StepOutput:
        out = self.model.forward_all(bags)
        self.teacher.eval()
        with torch.no_grad():
            target = self.teacher.forward_all(bags).bag_embedding
        ce = F.cross_entropy(out.logits.float(), bags.labels, weight=ctx.class_weight)
        consistency = F.mse_loss(out.bag_embedding, target)
        terms = {"ce": ce.detach(), "consistency": consistency.detach()}
        return StepOutput(ce + self.config.weight * consistency, terms)

    def after_optimizer_step(self, ctx: StepContext) -> None:
        ema_update_(list(self.teacher.parameters()), list(self.model.parameters()), self.config.momentum,
                    ctx.step_applied)  # False after a step fp16 loss scaling skipped: the teacher stays


DATA = SynthConfig(n_slides=16, dim=8, median_instances=60, min_instances=16, size_sigma=0.2, seed=1)
FAMILY = "methods.engine"
CONFIG = {"model": {"embed_dim": 8, "attn_dim": 4, "dropout": 0.25}, "method": {"name": "toy-ema", "momentum": 0.8},
          "optim": {"epochs": 3, "lr": 1e-3}, "run": {"seed": 7}, "data": {"val_fraction": 0.25, "test_fraction": 0.0}}


def test_toy_method_trains_through_fit_and_logs_its_terms(tmp_path):
    store = synthesize_store(DATA, tmp_path / "store", progress=False)
    result = fit(store, tmp_path / "run", TrainConfig.from_dict(CONFIG), progress=False)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [r["epoch"] for r in history] == [0, 1, 2]
    steps = DATA.n_slides - result.metrics["val"]["n"]  # one bag per step
    for record in history:
        assert set(record["train"]) == {"loss", "ce", "consistency"}
        # the epoch means of fp32 terms (all >= 0): each step's loss ce + 0.5 consistency (+ 1), each term's fp32
        # sum over the epoch's steps; two computed sides (twice the bound)
        want = record["train"]["ce"] + 0.5 * record["train"]["consistency"]
        check(abs(record["train"]["loss"] - want) / want, 2 * rounding_bound(steps + 1), FAMILY,
              "epoch loss = ce + 0.5 consistency")
        assert record["train"]["consistency"] > 0  # the teacher lags the student
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [float(r["train_consistency"]) for r in rows] == pytest.approx([r["train"]["consistency"] for r in history])
    # the teacher is method state: in the checkpoint, and not trained by the optimiser (only EMA moves it)
    state = load_checkpoint(tmp_path / "run" / "last.pt")["method_state"]
    assert any(k.startswith("teacher.") for k in state) and any(k.startswith("model.") for k in state)
    method, cfg, _ = load_method(tmp_path / "run", store)
    assert isinstance(method, ToyEMA) and cfg.method.momentum == 0.8
    assert all(not p.requires_grad for p in method.teacher.parameters())
    assert result.metrics["val"]["n"] == 4


_KILL = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import torch
    import tests.methods.test_engine as engine  # registers the toy method
    from fastmil.train import TrainConfig, fit
    torch.set_num_threads({threads})  # the test process's: the thread count decides torch's reduction order
    def kill(epoch, step, loss):
        if epoch == 1 and step == 4:
            os.kill(os.getpid(), signal.SIGKILL)
    fit(sys.argv[1], sys.argv[2], TrainConfig.from_dict(engine.CONFIG), progress=False, step_callback=kill)
""")


def test_resume_after_sigkill_reproduces_student_and_teacher_bit_for_bit(tmp_path):
    store = synthesize_store(DATA, tmp_path / "store", progress=False)
    full = fit(store, tmp_path / "full", TrainConfig.from_dict(CONFIG), progress=False)
    # bitwise equality holds because the killed run's first epoch runs the same kernels in the same order as the
    # uninterrupted run's: same code path (MKL_CBWR, ATEN_CPU_CAPABILITY come with the environment), same threads
    script = _KILL.format(repo=str(REPO), threads=torch.get_num_threads())
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "store"), str(tmp_path / "killed")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    killed = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert killed["train_state"]["epochs_done"] == 1  # killed inside the second epoch
    resumed = fit(store, tmp_path / "killed", TrainConfig.from_dict(CONFIG), resume=True, progress=False)
    a = load_checkpoint(tmp_path / "full" / "last.pt")["method_state"]
    b = load_checkpoint(tmp_path / "killed" / "last.pt")["method_state"]
    assert a.keys() == b.keys() and any(k.startswith("teacher.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # and the teacher really moved away from its initialisation (the EMA is exercised, not a copy)
    assert not torch.equal(a["teacher.classifier.weight"], a["model.classifier.weight"])
    assert [r["train"] for r in resumed.history] == [r["train"] for r in full.history]


def test_registry_and_method_config_errors():
    assert get_method("toy-ema") is ToyEMA and "plain" in METHODS
    with pytest.raises(ConfigError, match="unknown method 'toy-em' \\(did you mean 'toy-ema'\\?\\)"):
        get_method("toy-em")
    with pytest.raises(ConfigError, match="method: unknown key 'momentun' \\(did you mean 'momentum'\\?\\)"):
        method_config({"name": "toy-ema", "momentun": 0.5})
    assert method_config({"name": "toy-ema", "momentum": "0.5"}).momentum == 0.5  # converted to the declared type
    with pytest.raises(ValueError, match="already registered"):
        register_method("toy-ema")(type("Other", (ToyEMA,), {}))
    with pytest.raises(TypeError, match="not a fastmil.methods.Method"):
        register_method("not-a-method")(object)
    method = build_method(method_config({"name": "toy-ema"}), model_config({"embed_dim": 4, "attn_dim": 2}), 6, 2)
    trained = {id(p) for p in method.trainable_parameters()}
    assert trained == {id(p) for p in method.model.parameters()}
    assert not trained & {id(p) for p in method.teacher.parameters()}


def test_ema_update_is_the_formula_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    target = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    source = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    expected = [0.9997 * t + (1 - 0.9997) * s for t, s in zip(target, source)]
    ema_update_(target, source, 0.9997)
    for got, want in zip(target, expected):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="2 target tensors for 1 source"):
        ema_update_(target, source[:1], 0.5)
