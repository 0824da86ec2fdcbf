"""The ``fastmil`` command line. ``fastmil --help`` and ``fastmil COMMAND --help`` describe every option."""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path

__all__ = ["main", "build_parser"]


def _cmd_synth(args: argparse.Namespace) -> int:
    from .data.synthetic import SynthConfig, synthesize_store

    cfg = SynthConfig(
        n_slides=args.slides,
        dim=args.dim,
        seed=args.seed,
        positive_fraction=args.positive_fraction,
        tumour_fraction_min=args.tumour_min,
        tumour_fraction_max=args.tumour_max,
        median_instances=args.median_instances,
        size_sigma=args.size_sigma,
        min_instances=args.min_instances,
        max_instances=args.max_instances,
        layout=args.layout,
        clam_coords_dir=args.clam_coords_dir,
        tumour_snr=args.tumour_snr,
        dtype=args.dtype,
        survival=args.survival,
    )
    store = synthesize_store(cfg, args.out_store, progress=not args.quiet)
    _print_summary(store.summary())
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from .data.importers import ingest, write_failures
    from .data.store import open_store

    report = ingest(
        args.src_dir,
        args.out_store,
        format=args.format,
        coords_dir=args.coords_dir,
        labels_csv=args.labels,
        encoder=args.encoder,
        chunk_rows=args.chunk_rows,
        dtype=args.dtype,
        compression=args.compression,
        strict=args.strict,
        progress=not args.quiet,
        lock_timeout=args.wait,
    )
    print(f"ingest: {len(report.written)} slide(s) written, {len(report.skipped)} already present (skipped), "
          f"{len(report.failed)} failed")
    failures = Path(args.failures or f"{str(args.out_store).rstrip('/')}.failures.csv")
    if report.failed:
        write_failures(failures, report.failed)
        for sid, reason in report.failed:
            print(f"  FAILED {sid}: {reason}", file=sys.stderr)
        print(f"  failures listed in {failures}", file=sys.stderr)
    elif failures.exists():
        failures.unlink()  # from an earlier run whose failed slides have since been ingested
    if report.without_coords:
        print(f"  {len(report.without_coords)} slide(s) have no coordinates (spatial methods will refuse them)")
    if report.classes is not None:
        print(f"  {report.labelled} label(s) recorded; classes: {report.classes}")
    if args.survival:
        _record_survival(args.out_store, args.survival, args.strict)
    _print_summary(open_store(args.out_store).summary())
    return 1 if report.failed else 0


def _record_survival(store_path: str, csv_path: str, strict: bool) -> None:
    """Store the survival targets of a CSV for the store's slides; slides not in the store are reported (an error
    with ``--strict``)."""
    from .data.store import open_store
    from .survival.targets import read_survival_csv, write_survival_to_store

    store = open_store(store_path, mode="a")
    records = read_survival_csv(csv_path)
    unknown = sorted(s for s in records if s not in store)
    if unknown and strict:
        raise ValueError(f"{csv_path}: survival targets for {len(unknown)} slide(s) not in the store: {unknown[:5]}")
    if unknown:
        print(f"  warning: {len(unknown)} slide(s) of {csv_path} are not in the store (left out): "
              f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}", file=sys.stderr)
    write_survival_to_store(store, {s: r for s, r in records.items() if s in store})
    print(f"  survival targets recorded for {len(records) - len(unknown)} slide(s), "
          f"{len({r.case_id for s, r in records.items() if s in store})} patient(s)")


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import compare_runs, format_changes, write_report

    if args.action == "compare":
        if len(args.files) != 2:
            raise ValueError("bench compare needs two files: A.json B.json")
        changes, only_a, only_b = compare_runs(args.files[0], args.files[1], noise_factor=args.noise_factor,
                                               min_change=args.min_change)
        print(format_changes(changes, only_a, only_b))
        return 1 if any(c.status == "regression" for c in changes) else 0
    if len(args.files) != 1:
        raise ValueError("bench report needs one file: RUN.json")
    path = write_report(args.files[0], args.out or Path(args.files[0]).parent)
    print(f"report written to {path}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from .data.store import open_store

    summary = open_store(args.store).summary()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0


def _cmd_tile(args: argparse.Namespace) -> int:
    from .data.tiling import tile_slide_to_h5

    n = tile_slide_to_h5(args.slide, args.out_h5, patch_size=args.patch_size, min_tissue=args.min_tissue,
                         progress=not args.quiet)
    print(f"tile: {n} tissue tiles of {args.patch_size}px -> {args.out_h5}")
    return 0


def _train_overrides(args: argparse.Namespace) -> list[str]:
    """The dotted overrides of ``fastmil train``: the shortcut flags first, then ``section.key=value`` items."""
    flags = {"model.name": args.model, "method.name": args.method, "optim.epochs": args.epochs,
             "run.seed": args.seed, "run.device": args.device, "run.workers": getattr(args, "workers", None)}
    return [f"{k}={v}" for k, v in flags.items() if v is not None] + list(args.overrides)


def _import_plugins(modules: list[str]) -> None:
    """Import user modules that register their own methods or models (``--import my_lab.methods``)."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"--import {name}: {exc}") from exc


def _cmd_train(args: argparse.Namespace) -> int:
    from .methods import METHODS
    from .nn import MODELS
    from .train import fit, load_config

    _import_plugins(args.imports)
    if args.method in MODELS and args.method not in METHODS:
        raise ValueError(f"{args.method!r} is a model, not a training method: use --model {args.method} "
                         f"(methods: {', '.join(sorted(METHODS))})")
    if args.resume and args.config is None:  # continue with the run's own config, plus what is given here
        from .train import RunFolder, TrainConfig

        cfg = TrainConfig.from_dict(RunFolder(args.out).read_config()).with_overrides(_train_overrides(args))
    else:
        cfg = load_config(args.config, _train_overrides(args))
    if cfg.run.workers > 1:  # data parallel on Ray Train (ray_jobs.ddp); the run folder is the same
        import json

        run_dir = _ray_jobs("ddp").train_data_parallel(args.store, args.out, cfg, workers=cfg.run.workers,
                                                       resume=args.resume, split_csv=args.split_csv)
        _print_metrics(json.loads((run_dir / "metrics.json").read_text()))  # rank 0 evaluated the best model
        print(f"run folder {run_dir} ({cfg.run.workers} data-parallel workers)")
        return 0
    result = fit(args.store, args.out, cfg, split_csv=args.split_csv, resume=args.resume, progress=not args.quiet)
    _print_metrics(result.metrics)
    print(f"best epoch {result.best_epoch + 1} (1-based); run folder {result.run_dir}")
    return 0


def _ray_jobs(module: str):
    """``ray_jobs.<module>`` (installed with fastmil; needs the ``[ray]`` extra)."""
    import importlib
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ValueError("this command runs on Ray: pip install 'fastmil[ray]' (or -e '.[ray]')")
    return importlib.import_module(f"ray_jobs.{module}")


def _cmd_sweep(args: argparse.Namespace) -> int:
    return _ray_jobs("sweep").main(args=args)


def _cmd_cv(args: argparse.Namespace) -> int:
    from .train import load_config
    from .train.cv import cross_validate

    _import_plugins(args.imports)
    rows = cross_validate(args.store, args.out, load_config(args.config, _train_overrides(args)), folds=args.folds,
                          split_dir=args.split_dir, cases_csv=args.cases, progress=not args.quiet)
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for row in rows:
        print(f"{row['metric']:<20} {fmt(row['mean'])} ± {fmt(row['sd'])}")
    print(f"per-fold runs, splits and summary.csv / summary.md in {args.out}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .train import evaluate

    _print_metrics(evaluate(args.run, args.store, progress=not args.quiet))
    print(f"metrics written to {args.run}/metrics.json")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .train import predict

    out = predict(args.run, args.store, args.out, args.slide_ids, split=args.split, heatmaps=not args.no_heatmaps,
                  slides_dir=args.slides_dir, top_k=args.top_k, geojson=args.geojson, progress=not args.quiet)
    curves = "km_<split>.png" if any(out.glob("km_*.png")) else \
        "roc/pr/confusion_<split>.png"
    print(f"predictions written to {out} (predictions.csv, metrics.json, {curves}, attention/, "
          f"heatmaps/, top_k/{', geojson/' if args.geojson else ''}{', overlays/' if args.slides_dir else ''})")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .train.demo import run_demo

    run_demo(args.out, progress=not args.quiet)
    return 0


def _print_metrics(metrics: dict) -> None:
    from .train.metrics import format_metrics_table

    print(format_metrics_table(metrics))


def _print_summary(s: dict) -> None:
    print(f"store {s['path']}")
    print(f"  slides      {s['slides']}  ({s['slides_with_coords']} with coordinates)")
    print(
        f"  instances   total {s['instances_total']:,}  min {s['instances_min']:,}  "
        f"median {s['instances_median']:,.0f}  max {s['instances_max']:,}"
    )
    print(f"  feature dim {', '.join(map(str, s['dims'])) or '-'}  dtype {', '.join(s['dtypes']) or '-'}")
    if s["classes"]:
        print(f"  classes     {s['classes']}")
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(s["label_counts"].items()))
    print(f"  labels      {counts or '-'}")


def _add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The training config options shared by ``train`` and ``cv``."""
    p.add_argument("--config", default=None, metavar="YAML",
                   help="config with sections model/method/optim/data/run/task (see fastmil.train.config)")
    p.add_argument("--model", default=None,
                   help="model.name: abmil (default), meanmil, dsmil, clam_sb, clam_mb, transmil or graphmil (SRMIL's "
                        "network, the default of method srmil and mhim+srmil)")
    p.add_argument("--method", default=None, help="method.name: plain (default), mhim, srmil or mhim+srmil")
    p.add_argument("--epochs", type=int, default=None, help="optim.epochs")
    p.add_argument("--seed", type=int, default=None, help="run.seed")
    p.add_argument("--device", default=None, help="run.device: auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a module that registers your own methods/models (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE",
                   help="config overrides, e.g. optim.lr=1e-4 run.amp=bf16 (applied after --config)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .data.synthetic import SynthConfig

    defaults = {f.name: f.default for f in fields(SynthConfig)}
    parser = argparse.ArgumentParser(
        prog="fastmil",
        description="Multiple-instance learning on whole-slide images: feature stores, training, kernels.",
    )
    parser.add_argument("--version", action="version", version=f"fastmil {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        return p

    p = add("synth", _cmd_synth, "Write a synthetic cohort of spatially realistic slides into a store.")
    p.add_argument("out_store", metavar="OUT_STORE", help="store path (created; re-running resumes)")
    p.add_argument("--slides", type=int, default=defaults["n_slides"], help="number of slides (default %(default)s)")
    p.add_argument("--dim", type=int, default=defaults["dim"], help="feature dimension D (default %(default)s)")
    p.add_argument("--seed", type=int, default=defaults["seed"], help="random seed (default %(default)s)")
    p.add_argument("--positive-fraction", type=float, default=defaults["positive_fraction"],
                   help="fraction of tumour slides (default %(default)s)")
    p.add_argument("--tumour-min", type=float, default=defaults["tumour_fraction_min"],
                   help="min fraction of tumour patches in a positive slide (default %(default)s)")
    p.add_argument("--tumour-max", type=float, default=defaults["tumour_fraction_max"],
                   help="max fraction of tumour patches in a positive slide (default %(default)s)")
    p.add_argument("--median-instances", type=int, default=defaults["median_instances"],
                   help="median bag size of the log-normal size distribution (default %(default)s)")
    p.add_argument("--size-sigma", type=float, default=defaults["size_sigma"],
                   help="log-normal sigma of bag sizes (default %(default)s)")
    p.add_argument("--min-instances", type=int, default=defaults["min_instances"], help="(default %(default)s)")
    p.add_argument("--max-instances", type=int, default=defaults["max_instances"], help="(default %(default)s)")
    p.add_argument("--layout", choices=["procedural", "clam", "mixed"], default=defaults["layout"],
                   help="tissue layouts: procedural, real CLAM coordinate files, or both (default %(default)s)")
    p.add_argument("--clam-coords-dir", default=None, help="folder of CLAM coordinate .h5 files (layout clam/mixed)")
    p.add_argument("--tumour-snr", type=float, default=defaults["tumour_snr"],
                   help="tumour feature shift in noise standard deviations (default %(default)s)")
    p.add_argument("--dtype", choices=["float16", "float32"], default=defaults["dtype"],
                   help="stored feature dtype (default %(default)s)")
    p.add_argument("--survival", action="store_true",
                   help="a survival cohort: patients and event times driven by tumour burden (task: survival)")

    p = add("ingest", _cmd_ingest, "Import TRIDENT/CLAM .h5 or CLAM/MHIM .pt feature files into a store.")
    p.add_argument("src_dir", metavar="SRC_DIR",
                   help="folder of <slide_id>.h5 / <slide_id>.pt (or h5_files/, pt_files/)")
    p.add_argument("out_store", metavar="OUT_STORE", help="store path (created if needed; re-running resumes)")
    p.add_argument("--format", choices=["auto", "h5", "pt"], default="auto", help="source format (default %(default)s)")
    p.add_argument("--coords-dir", default=None, help="folder of <slide_id>.h5 coordinate files for .pt features")
    p.add_argument("--labels", default=None, metavar="CSV", help="CSV with slide_id,label columns")
    p.add_argument("--survival", default=None, metavar="CSV",
                   help="survival CSV (slide_id, time, event, optional case_id) recorded in the store")
    p.add_argument("--encoder", default=None, help="name of the patch encoder, recorded in slide attrs")
    p.add_argument("--chunk-rows", type=int, default=4096, help="rows per feature chunk (default %(default)s)")
    p.add_argument("--dtype", choices=["float16", "float32"], default=None,
                   help="stored feature dtype (default: float16 stays float16, else float32)")
    p.add_argument("--compression", choices=["zstd"], default=None, help="compress feature chunks (default: none)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first bad slide, and make labels for unknown slides an error")
    p.add_argument("--failures", default=None, metavar="CSV",
                   help="where to list the slides that failed (default: OUT_STORE.failures.csv)")
    p.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                   help="wait up to this long for another process writing the store (one writer at a time; "
                        "default: refuse at once, naming it)")

    p = add("bench", _cmd_bench, "Compare two benchmark runs, or write the report of one (pytest-benchmark JSON).")
    p.add_argument("action", choices=["compare", "report"],
                   help="compare A.json B.json: per-case change, regressions beyond the measured noise flagged "
                        "(exit 1 when there is one); report RUN.json: report.md and plots")
    p.add_argument("files", nargs="+", metavar="JSON")
    p.add_argument("--out", default=None, help="report: output folder (default: beside the JSON file)")
    p.add_argument("--noise-factor", type=float, default=3.0,
                   help="compare: a time change counts beyond this many relative IQRs (default %(default)s)")
    p.add_argument("--min-change", type=float, default=0.05,
                   help="compare: smallest relative change ever flagged (default %(default)s)")

    p = add("info", _cmd_info, "Summarise a store: slides, instance counts, dims, label counts.")
    p.add_argument("store", metavar="STORE")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = add("train", _cmd_train, "Train a MIL model on the labelled slides of a store.")
    p.add_argument("--store", required=True, help="feature store")
    p.add_argument("--out", required=True, help="run folder (checkpoints, config, metrics)")
    _add_config_arguments(p)
    p.add_argument("--split-csv", default=None, metavar="CSV",
                   help="CLAM-style splits_k.csv (default: stratified random)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--workers", type=int, default=None,
                   help="run.workers: data-parallel processes on Ray Train (default 1: this process)")

    p = add("sweep", _cmd_sweep, "Hyper-parameter sweep on Ray Tune (ASHA by default); see ray_jobs/README.md.")
    _ray_sweep_arguments(p)

    p = add("cv", _cmd_cv, "k-fold cross-validation with patient-level splits: one run per fold, and a summary.")
    p.add_argument("--store", required=True, help="feature store")
    p.add_argument("--out", required=True, help="folder for splits/, fold_<k>/ runs and summary.csv/.md")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default %(default)s)")
    p.add_argument("--split-dir", default=None, metavar="DIR",
                   help="use the folds of a folder of CLAM splits_<k>.csv / splits_<k>_bool.csv files")
    p.add_argument("--cases", default=None, metavar="CSV",
                   help="CSV with slide_id and case_id columns: a patient's slides stay in one split")
    _add_config_arguments(p)

    p = add("eval", _cmd_eval, "Evaluate a run's best model on its splits; writes RUN/metrics.json.")
    p.add_argument("--run", required=True, help="run folder written by fastmil train")
    p.add_argument("--store", required=True, help="feature store")

    p = add("predict", _cmd_predict,
            "Per-slide probabilities, attention, heatmaps, and metrics and curves per split for a trained run.")
    p.add_argument("--run", required=True, help="run folder written by fastmil train")
    p.add_argument("--store", required=True, help="feature store")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--slide-ids", nargs="*", default=None, help="slide ids (default: every slide in the store)")
    p.add_argument("--slides", dest="slides_dir", default=None, metavar="DIR",
                   help="folder of the slide files (<slide_id>.svs, ...): attention over the thumbnail, and crops "
                        "of the top-k patches (needs the [wsi] extra)")
    p.add_argument("--top-k", type=int, default=16, help="most attended patches listed per slide (default 16; 0: none)")
    p.add_argument("--geojson", action="store_true",
                   help="write each slide's patches with their attention as QuPath-readable GeoJSON")
    p.add_argument("--split", choices=["all", "train", "val", "test"], default="all",
                   help="only the slides of this split of the run (default: all; metrics and curves are per split)")
    p.add_argument("--no-heatmaps", action="store_true", help="skip the heatmap PNGs")

    p = add("demo", _cmd_demo, "Synthesise a cohort, train ABMIL, evaluate and predict; print a short report.")
    p.add_argument("--out", default="demo_out", help="output folder (default %(default)s)")

    p = add("tile", _cmd_tile, "Tile a real slide (tissue filter) into a TRIDENT-style h5 of colour features.")
    p.add_argument("slide", metavar="SLIDE", help="whole-slide image (.svs, .tif, ...)")
    p.add_argument("out_h5", metavar="OUT_H5")
    p.add_argument("--patch-size", type=int, default=224, help="tile size in level-0 pixels (default %(default)s)")
    p.add_argument("--min-tissue", type=float, default=0.5, help="min tissue fraction per tile (default %(default)s)")
    return parser


def _ray_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``python -m ray_jobs.sweep``, without importing Ray for the other commands' help."""
    p.add_argument("--config", default=None, metavar="SWEEP.yaml",
                   help="sweep config (ray_jobs/configs/*.yaml; the demo: ray_jobs/configs/demo.yaml)")
    p.add_argument("--store", default=None, help="feature store (overrides the config's)")
    p.add_argument("--out", default=None, help="experiment folder (overrides the config's)")
    p.add_argument("--num-samples", type=int, default=None, help="trials")
    p.add_argument("--gpus-per-trial", type=float, default=None,
                   help="GPUs per trial, fractional packs several (0.25: four trials per GPU; 0 on CPU)")
    p.add_argument("--cpus-per-trial", type=float, default=None, help="CPUs per trial")
    p.add_argument("--folds", type=int, default=None, help="score each config by the mean over k patient folds")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default=None, help="trial scheduler (default: asha)")
    p.add_argument("--max-failures", type=int, default=None, help="restarts of a failed trial")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out")
    p.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")


_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*\.[\w.]+=")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # section.key=value overrides may stand anywhere among the options (argparse alone wants them together)
    overrides = [a for a in argv if _OVERRIDE.match(a)]
    args = parser.parse_args([a for a in argv if not _OVERRIDE.match(a)])
    if overrides:
        if not hasattr(args, "overrides"):
            parser.error(f"{args.command} takes no section.key=value overrides (got {overrides[0]})")
        args.overrides = [*args.overrides, *overrides]
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as exc:  # user-facing input errors: one clear line, exit 2
        print(f"fastmil {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine's side (disk full, read-only, gone): one line naming it, exit 1
        print(f"fastmil {args.command}: error: {exc.strerror or exc}"
              f"{f' ({exc.filename})' if exc.filename else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
