"""Feature-parallel training under a real torchrun (2 processes, gloo on CPU) against one process: the same loss
curve and final weights for every activation, checkpoints that resume across world sizes in both directions, and
`clt train --nproc 2` end to end.

Every 2-rank training runs in ONE torchrun launch (tests/integration/tp_worker.py, which calls `train()` once per
run), so the file pays torchrun's start-up once; the 1-rank runs happen in this process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from safetensors.torch import load_file

from clt_core.data.norm_stats import compute_norm_stats
from clt_core.data.sampler import SamplerConfig
from clt_core.data.store import ActivationStore
from clt_core.data.synthetic import SyntheticConfig, make_synthetic_store
from clt_core.model.config import CLTConfig
from clt_core.train.config import TrainConfig
from clt_core.train.trainer import train

STEPS = 20
HALF = 10
"""Resumed runs restart from the step-HALF checkpoint."""
RTOL = 1e-4
"""Loss curves and weights of 1 and 2 ranks agree to float noise (measured: below 1e-6 relative)."""
ATOL = 1e-5
"""Weights near 0 compare absolutely (measured differences: below 1e-6)."""
COLLECTIVE_TIMEOUT_S = 10
"""A 2-rank run whose ranks wait on mismatched collectives fails after this long instead of hanging."""
SUBPROCESS_TIMEOUT_S = 300
WORKER = Path(__file__).with_name("tp_worker.py")

# Each case: TrainConfig fields on top of `base_config`. The AuxK cases use a dead-feature window of 1-2 batches so
# that features die (and AuxK contributes) from the second or third step on.
CASES: dict[str, dict[str, Any]] = {
    "jumprelu": {
        "model": CLTConfig(num_features=128, activation_fn="jumprelu"),
        "sparsity_lambda": 1e-2,
        "preactivation_coef": 1e-3,
    },
    "relu": {
        "model": CLTConfig(num_features=128, activation_fn="relu"),
        "sparsity_lambda": 1e-2,
        "preactivation_coef": 1e-3,
    },
    "batchtopk": {"model": CLTConfig(num_features=128, activation_fn="batchtopk", k=4)},
    "topk": {"model": CLTConfig(num_features=128, activation_fn="topk", k=4)},
    # Global scope with a 1-batch window: dozens of dead features on each rank at every step from the second on.
    "batchtopk-global-auxk": {
        "model": CLTConfig(num_features=128, activation_fn="batchtopk", k=4, topk_scope="global"),
        "auxk_coef": 1 / 32,
        "auxk_k": 64,
        "dead_feature_window": 256,
    },
    "topk-global-auxk": {
        "model": CLTConfig(num_features=128, activation_fn="topk", k=4, topk_scope="global"),
        "auxk_coef": 1 / 32,
        "auxk_k": 64,
        "dead_feature_window": 256,
    },
    # Per-layer scope with a 2-batch window: a few dead features, and at some steps they are all on one rank.
    "batchtopk-auxk": {
        "model": CLTConfig(num_features=128, activation_fn="batchtopk", k=4),
        "auxk_coef": 1 / 32,
        "auxk_k": 64,
        "dead_feature_window": 512,
    },
    "topk-auxk": {
        "model": CLTConfig(num_features=128, activation_fn="topk", k=4),
        "auxk_coef": 1 / 32,
        "auxk_k": 64,
        "dead_feature_window": 512,
    },
    # The per-layer-transcoder baseline: one decoder block per layer, on the sparse and on the dense path.
    "batchtopk-per-layer-decoders": {
        "model": CLTConfig(num_features=128, activation_fn="batchtopk", k=4, decoders="per_layer"),
    },
    "jumprelu-per-layer-decoders": {
        "model": CLTConfig(num_features=128, activation_fn="jumprelu", decoders="per_layer"),
        "sparsity_lambda": 1e-2,
        "preactivation_coef": 1e-3,
    },
}
# In "batchtopk-auxk" and "topk-auxk" the ranks' dead-feature sets go one-sided (one rank 1-2 dead, the other 0) at
# step 4 or 5: AuxK must still run its collectives on the rank without dead features, or training hangs.
RESUMED = ("jumprelu", "batchtopk-global-auxk")
"""Cases resumed across world sizes: penalties and thresholds; dead-feature counters that feed AuxK."""


def synthetic_store(url: str) -> str:
    spec = SyntheticConfig(
        rows=8192, num_layers=3, d_model=32, num_features=64, active_per_token=4, rows_per_chunk=256, dtype="float32"
    )
    make_synthetic_store(url, spec)
    compute_norm_stats(ActivationStore.open(url, "a"), progress=False)
    return url


def base_config(store: str, out: Path, case: str, steps: int = STEPS) -> TrainConfig:
    settings: dict[str, Any] = {
        "data": store,
        "output_dir": str(out),
        "sampler": SamplerConfig(batch_size=256, holdout_fraction=0.1, buffer_chunks=2),
        "training_steps": steps,
        "learning_rate": 1e-3,
        "log_interval": 1,
        "eval_interval": STEPS,
        "eval_rows": 512,
        "checkpoint_interval": HALF,
        "keep_checkpoints": 5,
        # Equality across world sizes is a float32 property: in bf16 each rank rounds its own partial sums.
        "precision": "fp32",
    }
    return TrainConfig(**{**settings, **CASES[case]})


def step_metrics(out: Path) -> dict[int, dict[str, Any]]:
    """Per-step training metrics of a run, by step."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss/total" in r}


def max_relative_difference(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]], steps: range) -> float:
    return max(abs(b[s]["loss/total"] - a[s]["loss/total"]) / abs(a[s]["loss/total"]) for s in steps)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def assert_same_weights(expected: Path, actual: Path) -> None:
    a, b = final_weights(expected), final_weights(actual)
    assert {k: v.shape for k, v in b.items()} == {k: v.shape for k, v in a.items()}
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")


def run_subprocess(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a command (torchrun, or the CLI that starts torchrun) and on a timeout end it and all its descendants:
    torchrun starts its workers in sessions of their own, out of reach of a process-group kill."""
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    try:
        output, _ = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        descendants = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        for child in descendants:
            if child.is_running():
                child.kill()
        pytest.fail(f"{' '.join(args)} ran past {SUBPROCESS_TIMEOUT_S} s; output:\n{output}")
    return subprocess.CompletedProcess(args, proc.returncode, output, None)


def child_env(tmp: Path) -> dict[str, str]:
    """The test's environment (CLT_CACHE_DIR included) with one thread per process: 2 ranks on 2 cores."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.setdefault("CLT_CACHE_DIR", str(tmp / "cache"))
    return env


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


@dataclass
class Runs:
    store: str
    root: Path
    outcomes: dict[str, list[dict[str, Any]]]
    """Per 2-rank output_dir, each rank's outcome from tp_worker: `{"steps", "error"}`."""
    launch_output: str

    def one(self, case: str) -> Path:
        return self.root / "one" / case

    def two(self, case: str) -> Path:
        return self.root / "two" / case

    def resumed_by_two(self, case: str) -> Path:
        return self.root / "one-then-two" / case

    def resumed_by_one(self, case: str) -> Path:
        return self.root / "two-then-one" / case

    def assert_two_rank_run_finished(self, out: Path, steps: int) -> None:
        outcomes = self.outcomes.get(str(out))
        detail = f"torchrun output (tail):\n{self.launch_output[-6000:]}"
        assert outcomes is not None and len(outcomes) == 2, f"{out}: no outcome from both ranks; {detail}"
        errors = [o["error"] for o in outcomes if o["error"]]
        assert not errors, f"{out}: the 2-rank run failed: {errors}; {detail}"
        assert [o["steps"] for o in outcomes] == [steps, steps]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return synthetic_store(str(tmp_path_factory.mktemp("data") / "store"))


@pytest.fixture(scope="module")
def runs(store: str, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    """Every 1-rank run in this process, then every 2-rank run in one torchrun launch."""
    root = tmp_path_factory.mktemp("tensor-parallel")
    layout = Runs(store, root, {}, "")
    for case in CASES:
        train(base_config(store, layout.one(case), case), progress=False)
    for case in RESUMED:
        train(base_config(store, layout.resumed_by_two(case), case, steps=HALF), progress=False)

    two_rank = [(base_config(store, layout.two(case), case), False) for case in CASES]
    two_rank += [(base_config(store, layout.resumed_by_two(case), case), True) for case in RESUMED]
    two_rank += [(base_config(store, layout.resumed_by_one(case), case, steps=HALF), False) for case in RESUMED]
    spec = root / "runs.json"
    spec.write_text(
        json.dumps(
            {
                "collective_timeout_s": COLLECTIVE_TIMEOUT_S,
                "runs": [{"config": cfg.model_dump(mode="json"), "resume": resume} for cfg, resume in two_rank],
            }
        )
    )
    done = run_subprocess([*torchrun(2), str(WORKER), str(spec)], child_env(root), cwd=root)
    layout.launch_output = done.stdout
    if done.returncode != 0:
        pytest.fail(f"torchrun exited with {done.returncode}:\n{done.stdout}")
    for rank in (0, 1):
        for outcome in json.loads(spec.with_suffix(f".rank{rank}.json").read_text()):
            layout.outcomes.setdefault(outcome["output_dir"], []).append(outcome)
    return layout


def exercises_its_loss_terms(case: str, metrics: dict[int, dict[str, Any]]) -> None:
    """The reference run really uses the penalties / AuxK its case is about."""
    settings = CASES[case]
    if settings.get("sparsity_lambda"):
        assert all(m["loss/sparsity"] > 0 for m in metrics.values())
    if settings.get("preactivation_coef"):
        assert all(m["loss/preactivation"] > 0 for m in metrics.values())
    if settings.get("auxk_coef"):
        with_auxk = [s for s, m in metrics.items() if m["loss/auxk"] > 0]
        assert len(with_auxk) >= STEPS // 2, f"AuxK contributed at steps {with_auxk} only"


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_follow_the_single_process_loss_curve_and_end_with_the_same_weights(runs: Runs, case: str) -> None:
    one, two = runs.one(case), runs.two(case)
    reference = step_metrics(one)
    assert sorted(reference) == list(range(1, STEPS + 1))
    exercises_its_loss_terms(case, reference)
    runs.assert_two_rank_run_finished(two, STEPS)
    parallel = step_metrics(two)
    assert sorted(parallel) == list(range(1, STEPS + 1))
    worst = max_relative_difference(reference, parallel, range(1, STEPS + 1))
    print(f"{case}: max relative difference of loss/total over {STEPS} steps, 2 ranks vs 1: {worst:.3g}")
    assert worst <= RTOL
    assert_same_weights(one, two)


@pytest.mark.parametrize("case", RESUMED)
def test_a_two_rank_checkpoint_resumes_in_one_process_with_the_uninterrupted_losses(runs: Runs, case: str) -> None:
    out = runs.resumed_by_one(case)
    runs.assert_two_rank_run_finished(out, HALF)
    assert sorted(step_metrics(out)) == list(range(1, HALF + 1))
    result = train(base_config(runs.store, out, case), resume=True, progress=False)
    assert result.steps == STEPS
    resumed = step_metrics(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))  # the first half's lines, then the resumed run's
    after = range(HALF + 1, STEPS + 1)
    for name, whole in (("1 rank", runs.one(case)), ("2 ranks", runs.two(case))):
        uninterrupted = step_metrics(whole)
        worst = max_relative_difference(uninterrupted, resumed, after)
        print(f"{case}: 2 ranks to step {HALF}, 1 rank to {STEPS}, vs {name} throughout: max rel. diff. {worst:.3g}")
        assert worst <= RTOL
        for s in after:  # the dead-feature counters crossed the world-size change intact
            assert resumed[s]["dead_fraction"] == uninterrupted[s]["dead_fraction"], f"step {s}"
    assert_same_weights(runs.one(case), out)


@pytest.mark.parametrize("case", RESUMED)
def test_a_one_process_checkpoint_resumes_on_two_ranks_with_the_uninterrupted_losses(runs: Runs, case: str) -> None:
    out = runs.resumed_by_two(case)
    runs.assert_two_rank_run_finished(out, STEPS)
    resumed = step_metrics(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    after = range(HALF + 1, STEPS + 1)
    for name, whole in (("1 rank", runs.one(case)), ("2 ranks", runs.two(case))):
        uninterrupted = step_metrics(whole)
        worst = max_relative_difference(uninterrupted, resumed, after)
        print(f"{case}: 1 rank to step {HALF}, 2 ranks to {STEPS}, vs {name} throughout: max rel. diff. {worst:.3g}")
        assert worst <= RTOL
        for s in after:
            assert resumed[s]["dead_fraction"] == uninterrupted[s]["dead_fraction"], f"step {s}"
    assert_same_weights(runs.one(case), out)


def test_clt_train_with_nproc_2_trains_under_torchrun_and_saves_an_unsharded_model(store: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    L, d, F, steps = 3, 32, 64, 5
    args = [sys.executable, "-m", "clt_core.cli", "train", "--nproc", "2", "--quiet", "--data", store,
            "--out", str(out), "--num-features", str(F), "--activation-fn", "batchtopk", "--k", "4",
            "--batch-size", "128", "--holdout-fraction", "0.1", "--buffer-chunks", "2",
            "--training-steps", str(steps), "--log-interval", "1", "--eval-rows", "256"]  # fmt: skip
    done = run_subprocess(args, child_env(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stdout
    summaries = re.findall(r"^trained (\d+) steps, held-out NMSE [\d.]+, L0 [\d.]+; final model in (.+)$",
                           done.stdout, flags=re.MULTILINE)  # fmt: skip
    assert summaries == [(str(steps), str(out / "final"))], done.stdout  # printed once, by rank 0
    weights = final_weights(out)
    expected = {"W_enc": (L, F, d), "b_enc": (L, F), "b_dec": (L, d)}
    expected |= {f"W_dec.{s}": (F, L - s, d) for s in range(L)}
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    assert sorted(step_metrics(out)) == list(range(1, steps + 1))


def test_a_live_run_on_2_ranks_shares_the_forward_passes_and_trains_as_one_process(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """Each rank runs the language model on its share of a buffer's windows and the ranks all-gather the rows, so
    the 2-rank run trains on the batches of the 1-rank run: the same losses and weights to float32 noise."""
    args = [sys.executable, "-m", "clt_core.cli", "train", "--quiet", "--model", str(tiny_dirs["llama"]),
            "--text", "packaged:kjv", "--tokens", "2000", "--context-size", "16", "--forward-batch", "4",
            "--shuffle-rows", "400", "--held-out-tokens", "256", "--compute-dtype", "float32", "--num-features", "64",
            "--activation-fn", "batchtopk", "--k", "4", "--batch-size", "100", "--precision", "fp32",
            "--learning-rate", "1e-3", "--log-interval", "1", "--eval-interval", "10",
            "--eval-rows", "256"]  # fmt: skip
    env = child_env(tmp_path)
    for nproc in (1, 2):
        done = run_subprocess([*args, "--nproc", str(nproc), "--out", str(tmp_path / str(nproc))], env, tmp_path)
        assert done.returncode == 0, done.stdout
    one, two = step_metrics(tmp_path / "1"), step_metrics(tmp_path / "2")
    assert sorted(one) == sorted(two) == list(range(1, 21))  # 2,000 tokens / 100 a batch
    assert max_relative_difference(one, two, range(1, 21)) <= RTOL
    assert_same_weights(tmp_path / "1", tmp_path / "2")
