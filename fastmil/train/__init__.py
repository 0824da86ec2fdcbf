"""fastmil.train: training loop, metrics, checkpoints, evaluation, prediction and heatmaps."""
from .config import TrainConfig, load_config
from .loop import RunResult, evaluate, fit, load_model, predict_slides
from .metrics import compute_metrics
from .predict import predict

__all__ = ["RunResult", "TrainConfig", "compute_metrics", "evaluate", "fit", "load_config", "load_model",
           "predict", "predict_slides"]
