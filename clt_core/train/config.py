"""What `clt train` reads: the model, the data, the optimiser, the loss weights and the intervals."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from clt_core.config import Config
from clt_core.data.sampler import SamplerConfig
from clt_core.extract.live import LiveConfig
from clt_core.model.config import CLTConfig


class TrainConfig(Config):
    """A training run."""

    data: str | None = None
    """Store URL to train on (`--data`); or `live`."""
    live: LiveConfig | None = None
    """Train straight from a language model instead of a store (`--model`, `--text`, `--tokens`): see
    `clt_core.extract.live`. The run is then ⌊live.tokens / sampler.batch_size⌋ steps (`training_steps` is set from
    it) and evaluates on `live.held_out_tokens` rows extracted into `OUT/held_out`."""
    output_dir: str = "clt-run"
    """Checkpoints, metrics.jsonl and the final model go here (`--out`)."""
    model: CLTConfig = CLTConfig(num_features=1024)
    """The CLT; num_layers and d_model come from the store."""
    sampler: SamplerConfig = SamplerConfig(holdout_fraction=0.05)
    """How batches are drawn; `sampler.batch_size` is the tokens per step."""
    training_steps: int = Field(1000, ge=1)
    """Optimiser steps in total (a resumed run continues up to this number); set from `live.tokens` for a live
    source."""
    optimizer: Literal["adamw", "adam"] = "adamw"
    learning_rate: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    """AdamW only."""
    betas: tuple[float, float] = (0.9, 0.999)
    lr_scheduler: Literal["constant", "linear", "cosine", "linear_final20"] = "constant"
    """Decay after warm-up: none, linear to 0, cosine to 0, or constant then linear to 0 over the last 20 %."""
    warmup_steps: int = Field(0, ge=0)
    """Linear learning-rate warm-up from 0."""
    grad_clip_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm (over all ranks) to this; None disables clipping."""
    sparsity_lambda: float = Field(0.0, ge=0)
    """Weight of the tanh sparsity penalty (usually 0 for topk/batchtopk)."""
    sparsity_c: float = Field(1.0, gt=0)
    """Scale inside the tanh."""
    sparsity_warmup_steps: int = Field(0, ge=0)
    """λ rises linearly from 0 to sparsity_lambda over these steps."""
    preactivation_coef: float = Field(0.0, ge=0)
    """Weight of the pre-activation penalty relu(θ − z)·‖W_dec‖."""
    auxk_coef: float = Field(0.0, ge=0)
    """Weight of the AuxK dead-feature loss (topk/batchtopk), e.g. 1/32."""
    auxk_k: int = Field(512, ge=1)
    """Dead features per token that the AuxK loss uses."""
    dead_feature_window: int = Field(1_000_000, ge=1)
    """A feature that has not fired in this many training tokens counts as dead."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """bf16: topk/batchtopk train on bf16 copies of the encoder and decoders (float32 masters, moments and
    accumulation; see model/sparse.py), other activations autocast their forward pass; fp32: float32 throughout;
    auto: bf16 on the sparse path (topk/batchtopk without sparsity, pre-activation or AuxK terms), where it is faster
    and as good, fp32 elsewhere (autocast is slower than float32 on CPU)."""
    threads: int | None = Field(None, ge=1)
    """CPU threads of the step (torch's intra-op threads). None: all cores, except for small steps (under 1 GFLOP
    of encoder work, e.g. L=4, d=64, F=512, B=512), which run on one and leave the other cores to the sampler's
    reads; OMP_NUM_THREADS, when the user set it (not the launcher), is kept."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu` or `cuda`."""
    log_interval: int = Field(50, ge=1)
    eval_interval: int = Field(500, ge=1)
    """Evaluate on the store's held-out chunks every this many steps (and at the end)."""
    eval_rows: int = Field(16384, ge=1)
    """Held-out rows per evaluation."""
    checkpoint_interval: int = Field(500, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    """Newest step checkpoints kept (the final model is kept apart)."""
    seed: int = 0
    """Seed of everything random in training that the model and sampler seeds do not cover."""
    mlflow_tracking_uri: str | None = None
    """Log params, metrics and plots to this MLflow tracking URI (e.g. sqlite:///mlflow.db); metrics.jsonl always.
    The feature-density plot is drawn only for MLflow (`clt evaluate` draws it for any model)."""
    mlflow_experiment: str = "clt"

    @model_validator(mode="after")
    def _one_source(self) -> TrainConfig:
        if self.data is not None and self.live is not None:
            raise ValueError("give either data (a store URL) or live (a model and text to stream), not both")
        if self.live is not None:
            steps = self.live.tokens // self.sampler.batch_size
            if steps < 1:
                raise ValueError(
                    f"live.tokens={self.live.tokens} is less than one batch of sampler.batch_size="
                    f"{self.sampler.batch_size}"
                )
            object.__setattr__(self, "training_steps", steps)  # validate_assignment would re-run this validator
        return self
