"""Data: the zarr feature store, importers, labels/splits, synthetic slides, tiling and bag batching."""
from .batching import BagBatchSampler, BagLoader
from .importers import IngestReport, discover_sources, ingest
from .labels import encode_labels, read_labels_csv, read_splits_csv
from .store import FeatureStore, StoreError, create_store, open_store
from .synthetic import SynthConfig, make_slide, synthesize_store

__all__ = [
    "BagBatchSampler",
    "BagLoader",
    "FeatureStore",
    "IngestReport",
    "StoreError",
    "SynthConfig",
    "create_store",
    "discover_sources",
    "encode_labels",
    "ingest",
    "make_slide",
    "open_store",
    "read_labels_csv",
    "read_splits_csv",
    "synthesize_store",
]
