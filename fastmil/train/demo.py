"""``fastmil demo``: synth -> train -> eval -> predict on the built-in synthetic dataset, with a short report."""
from __future__ import annotations

import os
import time
from pathlib import Path

from ..data.synthetic import SynthConfig, synthesize_store
from .config import TrainConfig
from .loop import fit
from .metrics import format_metrics_table
from .predict import predict

__all__ = ["DEMO_DATA", "DEMO_TRAIN", "run_demo"]

# Needle in a haystack: tumour covers 2-5% of the patches of a positive slide.
DEMO_DATA = SynthConfig(
    n_slides=200, dim=128, seed=0, median_instances=1000, size_sigma=0.5, tumour_fraction_min=0.02,
    tumour_fraction_max=0.05,
)
DEMO_TRAIN = TrainConfig.from_dict(
    model={"name": "abmil", "embed_dim": 128, "attn_dim": 64, "dropout": 0.1},
    optim={"epochs": 20, "lr": 1e-3},
    run={"patience": 6, "seed": 0},
)


def run_demo(out: str | os.PathLike = "demo_out", *, progress: bool = True) -> dict:
    """Run the whole pipeline into ``out`` (store/, run/, predictions/); returns the test metrics."""
    out = Path(out)
    t0 = time.perf_counter()
    store = synthesize_store(DEMO_DATA, out / "store", progress=progress)
    result = fit(store, out / "run", DEMO_TRAIN, resume=(out / "run" / "last.pt").exists(), progress=progress)
    pred_dir = predict(out / "run", store, out / "predictions", store.slide_ids, progress=progress)
    elapsed = time.perf_counter() - t0
    lines = [
        "",
        f"fastmil demo: {len(store)} synthetic slides (tumour {DEMO_DATA.tumour_fraction_min:.0%}-"
        f"{DEMO_DATA.tumour_fraction_max:.0%} of a positive slide), ABMIL, {DEMO_TRAIN.optim.epochs} epochs max",
        format_metrics_table(result.metrics),
    ]
    lines += [
        f"best epoch {result.best_epoch + 1} (1-based); wall time {elapsed:.0f} s",
        f"store        {out / 'store'}",
        f"run          {result.run_dir}  (config.yaml, best.pt, last.pt, metrics.json, history.json, metrics.csv)",
        f"predictions  {pred_dir}  (predictions.csv, metrics.json, roc_test.png, ..., attention/, heatmaps/)",
    ]
    print("\n".join(lines))
    return result.metrics["test"]
