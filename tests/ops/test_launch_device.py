"""Every kernel launch runs on its tensors' device (``kernels/_launch.py``, ``Launch``): Triton takes the device
and stream from the *current* CUDA device, so a launch enters the tensors' device first, and a launch whose
tensors are on different devices is refused with the devices named. No GPU here: a spy kernel stands in for the
Triton function, and the CUDA device is the one ``Launch.device`` reports."""
from __future__ import annotations

import contextlib

import pytest
import torch

from fastmil.kernels._launch import Launch


class SpyKernel:
    """Records, for every launch, the CUDA device that was current when the kernel ran."""

    __name__ = "spy_kernel"
    arg_names = ["x_ptr", "n"]

    def __init__(self, current):
        self.current, self.calls = current, []

    def __getitem__(self, grid):
        return lambda **kwargs: self.calls.append((grid, self.current[-1], kwargs["n"]))


def test_a_launch_enters_its_tensors_device(monkeypatch):
    current = ["cuda:0"]  # the caller's current device

    @contextlib.contextmanager
    def device(d):
        current.append(str(d))
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(torch.cuda, "device", device)
    kernel = SpyKernel(current)
    launch = Launch(kernel, (2,), {"x_ptr": torch.zeros(4), "n": 4}, num_warps=4, num_stages=3)
    monkeypatch.setattr(Launch, "device", property(lambda self: torch.device("cuda:1")))
    launch()
    assert kernel.calls == [((2,), "cuda:1", 4)] and current == ["cuda:0"]  # run on cuda:1, caller's device back


def test_cpu_tensors_launch_without_entering_a_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", lambda d: pytest.fail("entered a CUDA device for CPU tensors"))
    kernel = SpyKernel(["none"])
    Launch(kernel, (1,), {"x_ptr": torch.zeros(4), "n": 4}, num_warps=4, num_stages=3)()
    assert kernel.calls == [((1,), "none", 4)]


def test_tensors_on_different_devices_are_refused():
    kernel = SpyKernel(["none"])
    kernel.arg_names = ["x_ptr", "y_ptr", "n"]
    with pytest.raises(ValueError, match="different devices.*x_ptr.*cpu.*y_ptr.*meta"):
        Launch(kernel, (1,), {"x_ptr": torch.zeros(4), "y_ptr": torch.zeros(4, device="meta"), "n": 4},
               num_warps=4, num_stages=3)
