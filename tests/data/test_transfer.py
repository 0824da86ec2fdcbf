"""device_batches: batches reach the device unchanged and in order; on CUDA through a side stream the compute
stream waits for (the CUDA test runs only where a GPU is present)."""
import pytest
import torch

from fastmil.bags import Bags
from fastmil.data.transfer import batch_tensors, device_batches
from tests.tolerance import check_close, rounding_bound


def _batches(n_steps: int) -> list[Bags]:
    g = torch.Generator().manual_seed(0)
    steps = []
    for step in range(n_steps):
        sizes = [3 + step, 1]
        feats = [torch.randn(n, 8, generator=g) for n in sizes]
        coords = [torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.int64)], 1) for n in sizes]
        steps.append(Bags.from_list(feats, coords=coords, labels=[step % 2, 1], ids=[f"s{step}a", f"s{step}b"]))
    return steps


def _same(a: Bags, b: Bags) -> bool:
    return a.ids == b.ids and all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(batch_tensors(a), batch_tensors(b)))


def test_cpu_batches_pass_through_in_order_with_every_tensor():
    batches = _batches(3)
    moved = list(device_batches(iter(batches), torch.device("cpu")))
    assert len(moved) == 3 and all(_same(a, b) for a, b in zip(batches, moved))
    assert len(batch_tensors(batches[0])) == 4  # features, offsets, coords, labels (no neighbour table)


def test_errors_of_the_source_reach_the_consumer():
    def source():
        yield _batches(1)[0]
        raise ValueError("slide s1: truncated")

    out = device_batches(source(), torch.device("cpu"))
    next(out)
    with pytest.raises(ValueError, match="truncated"):
        next(out)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_copies_on_a_side_stream_one_step_ahead(monkeypatch):
    """Each copy runs on a stream other than the compute stream, batch i+1's copy is issued before batch i is
    yielded, and kernels of the compute stream read the copied values (a side stream slowed down by a sleep
    kernel before every copy would expose a missing wait)."""
    device = torch.device("cuda")
    batches = [b.pin_memory() for b in _batches(4)]
    compute = torch.cuda.current_stream(device)
    copy_streams, issued = [], []
    original = Bags.to

    def spying_to(self, target, non_blocking=False):
        if isinstance(target, torch.device) and target.type == "cuda":
            stream = torch.cuda.current_stream(device)
            copy_streams.append(stream)
            torch.cuda._sleep(10**7)  # ~ms of GPU time on the copy's stream before the copy
            issued.append(self.ids[0])
        return original(self, target, non_blocking)

    monkeypatch.setattr(Bags, "to", spying_to)
    results = []
    for k, bags in enumerate(device_batches(iter(batches), device)):
        assert issued[-1] == batches[min(k + 1, len(batches) - 1)].ids[0]  # one ahead
        assert bags.features.device.type == "cuda"
        results.append((bags.features * 2).sum())  # a kernel on the compute stream reading the copied batch
    assert all(stream != compute for stream in copy_streams)
    assert torch.cuda.current_stream(device) == compute
    torch.cuda.synchronize()
    for got, bags in zip(results, batches):
        # a CUDA reduction against the CPU's, each over the batch's numel() entries (the doubling is exact); the
        # entries are randn of both signs, so the error is relative to the sum of their magnitudes
        expected = (bags.features * 2).sum()
        check_close(got.cpu(), expected, rounding_bound(bags.features.numel()), "data", "sum on the compute stream",
                    scale=float((bags.features * 2).abs().sum()))
