"""fastmil.train: the method-agnostic trainer, config, metrics, checkpoints, evaluation, prediction, heatmaps."""
from .config import DataConfig, OptimConfig, RunConfig, TrainConfig, load_config
from .loop import RunResult, evaluate, fit, load_method, load_model
from .metrics import compute_metrics
from .predict import predict
from .run_folder import RunFolder
from .validate import predict_slides

__all__ = ["DataConfig", "OptimConfig", "RunConfig", "RunFolder", "RunResult", "TrainConfig", "compute_metrics",
           "evaluate", "fit", "load_config", "load_method", "load_model", "predict", "predict_slides"]
