"""The training loop: one encoder pass per step, feature-parallel under torchrun, exact resume.

Every rank of a feature-parallel run reads the same batches and holds a slice of the features; the loss each rank
backpropagates is the shared reconstruction loss plus its own features' penalties, so gradients need no
collective beyond the one in the forward pass. The global gradient norm for clipping is reduced over ranks (the
replicated decoder bias counted once).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from clt_core.data.sampler import ActivationSampler
from clt_core.data.store import ActivationStore
from clt_core.devices import resolve_device
from clt_core.errors import ConfigError
from clt_core.extract.extractor import extract
from clt_core.extract.live import LiveSource
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.config import CLTConfig
from clt_core.model.directory import gather_full, local_slice, read_normalizer
from clt_core.model.directory import save as save_model
from clt_core.model.parallel import FeatureShards
from clt_core.tracking import JsonlTracker, MlflowTracker, Trackers
from clt_core.train.checkpoint import load_training_state, read_trainer_state, save_checkpoint
from clt_core.train.config import TrainConfig
from clt_core.train.distributed import close_feature_shards, init_feature_shards
from clt_core.train.evaluation import evaluate_holdout
from clt_core.train.launch import threads_set_by_user
from clt_core.train.memory import check_fits, estimate_memory, reuse_freed_memory, small_step
from clt_core.train.schedules import lr_factor
from clt_core.train.step import TrainStep, uses_sparse_path

log = logging.getLogger(__name__)

# Settings a resumed run may change: they do not alter the run's math (training_steps extends or shortens it, and
# moves a decaying learning-rate schedule).
RESUMABLE_CHANGES = {
    "training_steps",
    "output_dir",
    "device",
    "threads",
    "log_interval",
    "eval_interval",
    "eval_rows",
    "checkpoint_interval",
    "keep_checkpoints",
    "mlflow_tracking_uri",
    "mlflow_experiment",
}
# ... and nested ones: skipping rows holding NaN/Inf can be switched on to get past them (the stream before the first
# such row is the same either way, and the sampler state records what was skipped).
RESUMABLE_EXCLUDE: dict[str, Any] = {**dict.fromkeys(RESUMABLE_CHANGES, True), "sampler": {"nonfinite": True}}


def _resumable_config(config: TrainConfig) -> dict[str, Any]:
    """The settings a resumed run must share with the run it continues."""
    return config.model_dump(mode="json", exclude=RESUMABLE_EXCLUDE)


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved run's settings with those it predates at their defaults (a setting added since, at its default, is no
    change); as saved when they no longer validate, so that the comparison names what differs."""
    try:
        return _resumable_config(TrainConfig.model_validate(saved))
    except ValueError:
        return saved


def _differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """`key: saved -> current` for every setting that differs (nested sections flattened to `a.b`)."""
    out = []
    for key in sorted(saved.keys() | current.keys()):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


@dataclass
class TrainResult:
    output_dir: Path
    final: Path
    """The final model's checkpoint directory."""
    steps: int
    evaluation: dict[str, Any]


def checkpoints(output_dir: Path, *, warn: bool = False) -> list[Path]:
    """Complete step checkpoints, oldest first. A checkpoint is written to `.step_N.tmp` and renamed when whole, so a
    partial one (killed while saving, or damaged) is never picked up; `warn` says so for each one found."""
    root = output_dir / "checkpoints"
    found = [p for p in root.glob("step_*") if (p / "trainer_state.json").exists()]
    if warn:
        for partial in sorted({*root.glob(".step_*.tmp"), *(p for p in root.glob("step_*") if p not in found)}):
            log.warning("ignoring the partial checkpoint %s (written when the run was killed, or damaged)", partial)
    return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))


def train(
    config: TrainConfig, *, resume: bool = False, progress: bool = True, progress_every: float | None = None
) -> TrainResult:
    """Train (or, with `resume`, continue training) a CLT on `config.data` (a store) or `config.live` (a language
    model streamed); see TrainConfig. `progress`: a tqdm bar; `progress_every`: instead, a line on stdout every that
    many seconds and at the end (for logs, not terminals).

    Metrics go to `metrics.jsonl`, and to MLflow when `mlflow_tracking_uri` is set (a run of their own) or
    `MLFLOW_RUN_ID` names a run (a pipeline's: metrics, params and plots under `train/`)."""
    if config.data is None and config.live is None:
        raise ConfigError(
            "no training data: pass --data URL, or --model M --text T --tokens N to train from a live model (or set "
            "`data:` or `live:` in the config)"
        )
    device = resolve_device(config.device)
    reuse_freed_memory()
    shards = init_feature_shards(device)
    try:
        return _train(config, shards, device, resume, progress, progress_every)
    finally:
        close_feature_shards(shards)


@dataclass
class _Data:
    """What a run reads: its batches (a store's sampler or a live source), where it evaluates, and what the model
    directory records about it."""

    num_layers: int
    d_model: int
    batches: ActivationSampler | LiveSource
    held_out: ActivationStore | None
    """The store evaluation reads (None: no evaluation)."""
    held_out_rows: tuple[int, int] | None
    """Its rows evaluation reads (None: the held-out tail the sampler settings define)."""
    source: dict[str, Any]
    data_bytes: int
    """Memory the batches' buffers take."""


def _open_store(config: TrainConfig) -> _Data:
    assert config.data is not None
    store = ActivationStore.open(config.data)
    sampler = ActivationSampler(store, config.sampler)
    source = {"data": store.url, "store": store.info.model_dump(mode="json"), "sampler": config.sampler.model_dump()}
    s = config.sampler
    window = s.buffer_chunks * store.rows_per_chunk * store.num_layers * store.d_model * store.torch_dtype.itemsize * 2
    held = store if s.holdout_fraction > 0 else None
    return _Data(store.num_layers, store.d_model, sampler, held, None, source, window * (s.prefetch_windows + 2))


def _open_live(config: TrainConfig, shards: FeatureShards, device: str, progress: bool) -> _Data:
    """A live source, and its held-out rows extracted (rank 0; the others wait) into `OUT/held_out`, or found there
    when resuming."""
    live = config.live
    assert live is not None
    import torch.distributed as dist

    group = dist.new_group(backend="gloo") if shards.world_size > 1 else None
    source = LiveSource(
        live, config.sampler, device=device, rank=shards.rank, world_size=shards.world_size, group=group,
        progress=progress,
    )  # fmt: skip
    L, d = source.num_layers, source.d_model
    held_out = None
    if live.held_out_tokens:
        url = str(Path(config.output_dir).absolute() / "held_out")
        if shards.rank == 0:
            Path(config.output_dir).mkdir(parents=True, exist_ok=True)
            summary = extract(url, live.held_out_config(L, d), progress=progress)
            log.info("held-out rows: %s", summary)
        shards.barrier()
        held_out = ActivationStore.open(url)
    record = {
        "data": held_out.url if held_out is not None else None,
        "live": live.model_dump(mode="json"),
        "store": held_out.info.model_dump(mode="json") if held_out is not None else source.store_info(),
        "sampler": config.sampler.model_dump(),
    }
    buffers = (live.prefetch_buffers + 2) * live.shuffle_rows * L * d * 2 * source.dtype.itemsize
    rows = (0, held_out.num_rows) if held_out is not None else None
    return _Data(L, d, source, held_out, rows, record, buffers + source.model_bytes())


def _train(
    config: TrainConfig, shards: FeatureShards, device: str, resume: bool, progress: bool, progress_every: float | None
) -> TrainResult:
    out_dir = Path(config.output_dir)
    bars = progress and progress_every is None  # progress lines for logs: no extraction bars either
    data = _open_store(config) if config.data is not None else _open_live(config, shards, device, bars)
    geometry = {"num_layers": data.num_layers, "d_model": data.d_model}
    what = f"the store {config.data}" if config.data is not None else f"the model {config.live and config.live.model}"
    for key, value in geometry.items():
        given = getattr(config.model, key)
        if given is not None and given != value:
            raise ConfigError(
                f"model.{key}={given} but {what} has {key}={value}; leave model.{key} unset (it comes from the data) "
                "or train on data of that model"
            )
    model_cfg = CLTConfig.from_dict({**config.model.model_dump(), **geometry}, source=what)  # checks k too
    estimate = estimate_memory(
        model_cfg, config, sparse=uses_sparse_path(config), world_size=shards.world_size, data_bytes=data.data_bytes
    )
    check_fits(estimate, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    elif device == "cpu" and not threads_set_by_user() and small_step(model_cfg, config, shards.world_size):
        torch.set_num_threads(1)  # a second thread gains less than the sampler's reads lose without a core
    torch.manual_seed(config.seed)
    model = CrossLayerTranscoder(model_cfg, shards).to(device)
    train_step = TrainStep(model, config, device)
    optimizer = train_step.optimizer
    sampler = data.batches
    L, F_local = model.num_layers, model.num_local_features
    since_fired = torch.zeros(L, F_local, dtype=torch.float64, device=device)
    step = 0
    existing = checkpoints(out_dir, warn=resume)
    if resume and existing:
        saved = _with_defaults(read_trainer_state(existing[-1])["config"])  # compared before any weight is loaded
        if changed := _differences(saved, _resumable_config(config)):
            raise ConfigError(
                f"{existing[-1]} was trained with other settings ({'; '.join(changed[:4])}"
                f"{f' and {len(changed) - 4} more' if len(changed) > 4 else ''}); resume with the same config"
            )
        state = load_training_state(existing[-1], model, optimizer)
        train_step.weights_loaded()
        if isinstance(sampler, LiveSource):
            sampler.load_state_dict(state["sampler"], read_normalizer(existing[-1]))
        else:
            sampler.load_state_dict(state["sampler"])
        step = state["step"]
        counters = torch.tensor(state["since_fired"], dtype=torch.float64)
        since_fired = local_slice(model, "b_enc", counters).to(device).clone()
    elif existing or (out_dir / "final").exists():
        raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out")
    if step < config.training_steps:
        # No window after the run's last batch is read at all (reading ahead would only compete with the step).
        sampler.read_ahead_until(sampler.position + (config.training_steps - step) * config.sampler.batch_size)
        sampler.start()  # the first window's problems (e.g. rows holding NaN/Inf) surface before anything is written
    extras = (sampler.normalizer, data.source)  # a live source's normaliser is known once it started (its warm-up)
    tracker: Trackers | None = None
    mlflow: MlflowTracker | None = None
    if shards.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.yaml").write_text(config.to_yaml())
        jsonl = JsonlTracker(out_dir / "metrics.jsonl")
        mlflow = _mlflow_tracker(config, out_dir.name)
        # The resolved model config (num_layers and d_model from the store); no tracking URI (it may hold a password).
        params = config.model_dump(mode="json", exclude={"mlflow_tracking_uri"})
        params["model"] = model_cfg.model_dump(mode="json")
        if step == 0:
            jsonl.log_params(params)
        if mlflow is not None:
            mlflow.log_params(params)  # every start: a resumed run logs into a new MLflow run
        tracker = Trackers(jsonl, *([mlflow] if mlflow is not None else []))

    batch_tokens = config.sampler.batch_size
    bar = tqdm(
        total=config.training_steps,
        initial=step,
        unit="step",
        desc="train",
        disable=not progress or progress_every is not None or shards.rank != 0,
    )
    lines = None
    if progress_every is not None and shards.rank == 0:
        lines = _ProgressLines(config.training_steps, step, batch_tokens, progress_every)
    if shards.rank == 0 and step < config.training_steps:  # after every refusal above: each is its one line
        n = torch.get_num_threads()
        threads = f"; {n} CPU thread{'s' if n > 1 else ''} per rank" if device == "cpu" else ""
        print(f"estimated peak memory per rank: {estimate.describe()}{threads}", flush=True)
    evaluation: dict[str, Any] = {}
    started, start_step = time.perf_counter(), step
    batches = iter(sampler)
    try:
        while step < config.training_steps:
            factor = lr_factor(step, config.training_steps, config.warmup_steps, config.lr_scheduler)
            for group in optimizer.param_groups:
                group["lr"] = config.learning_rate * factor
            batch = next(batches)
            x = batch.inputs.to(device, non_blocking=True)
            y = batch.targets.to(device, non_blocking=True)
            result = train_step(x, y, step, since_fired >= config.dead_feature_window)
            with torch.no_grad():  # masked_fill_, not indexing with the mask: no host sync on a GPU
                since_fired.add_(x.shape[0]).masked_fill_(result.fired, 0)
            step += 1
            bar.update(1)
            if step % config.log_interval == 0 or step == config.training_steps:
                metrics = _step_metrics(result, x.shape[0], shards, optimizer, since_fired, config)
                rate = (step - start_step) * batch_tokens / (time.perf_counter() - started)
                metrics["tokens_per_second"] = rate
                bar.set_postfix_str(f"loss {metrics['loss/total']:.4g}, {rate:,.0f} tok/s")
                if tracker is not None:
                    tracker.log_metrics(metrics, step)
                if lines is not None:
                    lines.loss = metrics["loss/total"]
            if lines is not None:
                lines.maybe_print(step, evaluation)
            if step % config.eval_interval == 0 or step == config.training_steps:
                evaluation = _evaluate(model, data, sampler.normalizer, config, device, tracker, step)
            if step % config.checkpoint_interval == 0 or step == config.training_steps:
                state = {
                    "step": step,
                    "sampler": sampler.state_dict(),
                    "config": _resumable_config(config),
                    "since_fired": gather_full(model, "b_enc", since_fired).cpu().tolist(),
                }
                save_checkpoint(out_dir / "checkpoints" / f"step_{step}", model, optimizer, state, *extras)
                if shards.rank == 0:
                    for old in checkpoints(out_dir)[: -config.keep_checkpoints]:
                        shutil.rmtree(old)
    finally:
        bar.close()
        sampler.close()
    save_model(out_dir / "final", model, *extras)
    if tracker is not None:
        if evaluation and mlflow is not None:  # for MLflow only: importing matplotlib takes a second of a small run
            from clt_core.evaluate.plots import plot_feature_density

            plot = plot_feature_density(evaluation["feature_density"], out_dir / "final" / "feature_density.png")
            tracker.log_artifact(plot)
        tracker.close()
    if lines is not None:
        lines.print(step, evaluation)
    return TrainResult(out_dir, out_dir / "final", step, evaluation)


def _mlflow_tracker(config: TrainConfig, run_name: str) -> MlflowTracker | None:
    """Into the MLflow run `MLFLOW_RUN_ID` names (a pipeline's, shared with other stages: names under `train/`),
    else into a new run when `mlflow_tracking_uri` is set, else none."""
    if run_id := os.environ.get("MLFLOW_RUN_ID"):  # the run lives where MLFLOW_TRACKING_URI points, if set
        uri = os.environ.get("MLFLOW_TRACKING_URI") or config.mlflow_tracking_uri
        return MlflowTracker(uri, run_id=run_id, prefix="train/")
    if config.mlflow_tracking_uri:
        return MlflowTracker(config.mlflow_tracking_uri, config.mlflow_experiment, run_name)
    return None


class _ProgressLines:
    """Progress for logs: a line on stdout every `seconds` (and one at the end) with the step, the last logged loss,
    tokens/s since this process started, the ETA and the latest held-out NMSE; no bar redraws."""

    def __init__(self, total: int, step: int, batch_tokens: int, seconds: float) -> None:
        self.total, self.first, self.batch_tokens, self.seconds = total, step, batch_tokens, seconds
        self.started = self.last = time.perf_counter()
        self.loss: float | None = None

    def maybe_print(self, step: int, evaluation: dict[str, Any]) -> None:
        """A line if `seconds` have passed since the last one (the last step's line comes from `print` at the end)."""
        if step < self.total and time.perf_counter() - self.last >= self.seconds:
            self.print(step, evaluation)

    def print(self, step: int, evaluation: dict[str, Any]) -> None:
        self.last = time.perf_counter()
        done, elapsed = step - self.first, self.last - self.started
        parts = [f"step {step}/{self.total} ({100 * step / self.total:.0f}%)"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4g}")
        if done > 0:
            parts.append(f"{done * self.batch_tokens / elapsed:,.0f} tok/s")
            left = (self.total - step) * elapsed / done
            parts.append(f"ETA {_duration(left)}" if step < self.total else f"done in {_duration(elapsed)}")
        if evaluation:
            parts.append(f"held-out NMSE {evaluation['mean_nmse']:.4g}")
        print(f"train: {', '.join(parts)}", flush=True)


def _duration(seconds: float) -> str:
    """`42s`, `3m07s`, `2h05m`."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    return f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


def _step_metrics(result, batch, shards, optimizer, since_fired, config) -> dict[str, float]:
    terms, grad_norm = result.terms, result.grad_norm
    local = torch.stack([terms.sparsity.detach(), terms.preactivation.detach()]).double()
    shards.all_reduce(local)
    l0 = shards.all_reduce(result.active / batch)
    dead = shards.all_reduce((since_fired >= config.dead_feature_window).double().sum())
    total_features = config.model.num_features * len(l0)
    metrics = {
        "loss/total": float(terms.reconstruction.detach() + local.sum() + terms.auxk.detach()),
        "loss/reconstruction": float(terms.reconstruction.detach()),
        "loss/sparsity": float(local[0]),
        "loss/preactivation": float(local[1]),
        "loss/auxk": float(terms.auxk.detach()),
        "l0/total": float(l0.sum()),
        "dead_fraction": float(dead / total_features),
        "grad_norm": grad_norm,
        "lr": optimizer.param_groups[0]["lr"],
    }
    metrics.update({f"l0/layer_{i}": float(v) for i, v in enumerate(l0)})
    return metrics


def _evaluate(model, data, normalizer, config, device, tracker, step) -> dict[str, Any]:
    if data.held_out is None:
        return {}
    sampler = config.sampler
    if data.held_out_rows is not None and normalizer is None:  # a live run without normalisation
        sampler = sampler.model_copy(update={"normalization_method": "none"})
    result = evaluate_holdout(
        model, data.held_out, sampler, config.eval_rows, device, rows=data.held_out_rows, normalizer=normalizer
    )
    if tracker is not None:
        flat = {"eval/mean_nmse": result["mean_nmse"], "eval/total_l0": result["total_l0"]}
        flat["eval/dead_fraction"] = result["dead_fraction"]
        flat.update({f"eval/nmse/layer_{i}": v for i, v in enumerate(result["nmse"])})
        flat.update({f"eval/explained_variance/layer_{i}": v for i, v in enumerate(result["explained_variance"])})
        tracker.log_metrics(flat, step)
    return result
