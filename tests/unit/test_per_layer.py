"""The per-layer-transcoder baseline (`decoders: per_layer`): each layer's features decode to their own layer alone,
through the same code as the CLT. A layer's reconstruction depends on that layer's input only; the model saves,
loads, trains (sparse and dense paths, `clt train --decoders`), converts to JumpReLU and evaluates; memory counts its
smaller decoders. (Sparse against dense, kernels, feature-shard init and export: test_sparse, test_model,
test_export.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from test_train import config, synthetic

from clt_core.cli import main
from clt_core.convert import ConvertConfig, convert
from clt_core.data.sampler import Normalizer, SamplerConfig
from clt_core.errors import ConfigError
from clt_core.evaluate import evaluate_model
from clt_core.model.clt import CrossLayerTranscoder
from clt_core.model.config import CLTConfig
from clt_core.model.directory import load, save
from clt_core.train.config import TrainConfig
from clt_core.train.memory import estimate_memory
from clt_core.train.trainer import TrainResult, train

sys.path.insert(0, str(Path(__file__).parent))
pytestmark = pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")

L, D, F = 3, 8, 32
F64 = torch.float64


def model_of(activation: str, decoders: str = "per_layer", **kw: object) -> CrossLayerTranscoder:
    cfg = CLTConfig(num_layers=L, d_model=D, num_features=F, activation_fn=activation, k=3, decoders=decoders, **kw)
    model = CrossLayerTranscoder(cfg, dtype=F64)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # biases away from 0, and some features active for relu/jumprelu
        model.b_enc.copy_(0.1 * torch.randn(L, F, generator=gen, dtype=F64))
        model.b_dec.copy_(0.1 * torch.randn(L, D, generator=gen, dtype=F64))
    return model


def inputs(seed: int = 0, B: int = 24) -> torch.Tensor:
    return torch.randn(B, L, D, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ----------------------------------------------------------------------------------------------------- independence
def input_gradient(model: CrossLayerTranscoder, x: torch.Tensor, target: int) -> torch.Tensor:
    """d(Σ reconstruction[:, target]) / dx, `[B, L, d]`."""
    x = x.clone().requires_grad_()
    model(x).reconstruction[:, target].sum().backward()
    assert x.grad is not None
    return x.grad


@pytest.mark.parametrize("activation", ["jumprelu", "relu", "batchtopk", "topk"])
def test_a_layers_reconstruction_depends_on_that_layer_alone(activation: str) -> None:
    """Per layer: the gradient of layer t's reconstruction reaches layer t's input only, and replacing any other
    layer's input leaves it bit for bit the same (selection included: k per layer). A CLT fails the same check."""
    model = model_of(activation)
    x = inputs()
    for t in range(L):
        grad = input_gradient(model, x, t)
        assert grad[:, t].abs().max() > 0
        assert torch.equal(grad[:, [s for s in range(L) if s != t]], torch.zeros(x.shape[0], L - 1, D, dtype=F64))
        perturbed = x.clone()
        for s in range(L):
            if s != t:
                perturbed[:, s] = inputs(seed=10 + s)[:, s]
        with torch.no_grad():
            assert torch.equal(model(perturbed).reconstruction[:, t], model(x).reconstruction[:, t])
    clt = model_of(activation, "cross_layer")
    assert input_gradient(clt, x, L - 1)[:, 0].abs().max() > 0  # a CLT's last layer reads layer 0 too


def test_the_sparse_path_keeps_the_layers_apart_too() -> None:
    """bf16 compute copies through the compiled (or PyTorch) kernels: layer t's reconstruction ignores other layers'
    inputs, and the loss's gradient reaches only the decoder blocks that exist."""
    model = model_of("batchtopk").float()
    weights = model.compute_weights(torch.bfloat16)
    assert [tuple(w.shape) for w in weights.W_dec] == [(1, F, D)] * L
    x = inputs().float()
    perturbed = x.clone()
    perturbed[:, 0] = inputs(seed=5)[:, 0].float()
    a, b = model.sparse_forward(x, weights), model.sparse_forward(perturbed, weights)
    assert torch.equal(a.reconstruction[:, 1:], b.reconstruction[:, 1:])
    assert not torch.equal(a.reconstruction[:, 0], b.reconstruction[:, 0])


# -------------------------------------------------------------------------------------------------- model directory
def normalizer() -> Normalizer:
    gen = torch.Generator().manual_seed(2)
    return Normalizer(torch.randn(L, D, generator=gen), torch.rand(L, D, generator=gen) + 0.5,
                      torch.randn(L, D, generator=gen), torch.rand(L, D, generator=gen) + 0.5)  # fmt: skip


def test_a_model_directory_records_the_decoders_and_loads_back(tmp_path: Path) -> None:
    model = model_of("jumprelu").float()
    save(tmp_path / "plt", model, normalizer(), {"data": "/store"})
    assert json.loads((tmp_path / "plt" / "config.json").read_text())["decoders"] == "per_layer"
    back = load(tmp_path / "plt").model
    assert back.config == model.config and back.config.decoders == "per_layer"
    for (name, p), q in zip(model.named_parameters(), back.parameters(), strict=True):
        assert torch.equal(p, q), name
    x = inputs().float()
    with torch.no_grad():
        assert torch.equal(back(x).reconstruction, model(x).reconstruction)


def test_a_directory_from_before_the_setting_loads_as_a_cross_layer_transcoder(tmp_path: Path) -> None:
    clt = model_of("relu", "cross_layer").float()
    save(tmp_path / "old", clt)
    config_file = tmp_path / "old" / "config.json"
    recorded = json.loads(config_file.read_text())
    del recorded["decoders"]
    config_file.write_text(json.dumps(recorded))
    back = load(tmp_path / "old").model
    assert back.config.decoders == "cross_layer" and [w.shape[1] for w in back.W_dec] == [3, 2, 1]
    # ...and weights of one kind under a config of the other are refused in one line
    recorded["decoders"] = "per_layer"
    config_file.write_text(json.dumps(recorded))
    with pytest.raises(ConfigError, match=r"W_dec\.0 of shape \(32, 3, 8\).*describes \(32, 1, 8\)"):
        load(tmp_path / "old")


def test_the_memory_estimate_counts_one_decoder_block_per_layer() -> None:
    Lb, d, Fb = 30, 576, 2048
    plt = CLTConfig(num_layers=Lb, d_model=d, num_features=Fb, activation_fn="batchtopk", k=32, decoders="per_layer")
    clt = plt.model_copy(update={"decoders": "cross_layer"})
    cfg = TrainConfig(model=plt, precision="bf16", sampler=SamplerConfig(batch_size=4096))
    params = {"per_layer": 2 * Lb * Fb * d + 2 * Lb * Fb + Lb * d, "cross_layer": None}
    estimates = {m.decoders: estimate_memory(m, cfg, sparse=True) for m in (plt, clt)}
    assert estimates["per_layer"].parameters == 4 * params["per_layer"]
    assert estimates["per_layer"].compute_copy == 2 * 2 * Lb * Fb * d
    assert estimates["per_layer"].optimizer == 8 * params["per_layer"]
    assert estimates["cross_layer"].parameters > 8 * estimates["per_layer"].parameters  # 465 blocks against 30


# --------------------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return synthetic(str(tmp_path_factory.mktemp("data") / "store"))


STEPS = 150


def planted(store: str, out: Path, decoders: str) -> TrainResult:
    """batchtopk k=4 per layer (the sparse path, bf16 compute copies) on the planted cross-layer dictionary."""
    cfg = config(store, out, training_steps=STEPS, eval_interval=STEPS, checkpoint_interval=STEPS, learning_rate=3e-3,
                 model=CLTConfig(num_features=128, activation_fn="batchtopk", k=4, decoders=decoders))  # fmt: skip
    return train(cfg, progress=False)


@pytest.fixture(scope="module")
def trained(store: str, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    return planted(store, tmp_path_factory.mktemp("plt") / "run", "per_layer")


def reconstruction_losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss/reconstruction"] for r in lines if "loss/reconstruction" in r]


def test_a_per_layer_transcoder_learns_and_the_clt_beats_it_where_layers_mix(
    trained: TrainResult, store: str, tmp_path: Path
) -> None:
    """The store's targets at layer t sum the planted decoders of layers 0..t, its inputs at t hold layer t's features
    alone. Layer 0 is the same problem for both (one source): the PLT learns it as well as the CLT. Deeper layers
    mix earlier layers' features, which only the CLT can read: at the same L0 it beats the PLT there."""
    losses = reconstruction_losses(trained.output_dir)
    assert len(losses) == STEPS and sum(losses[-5:]) < 0.8 * sum(losses[:5])
    model = load(trained.final).model
    assert model.config.decoders == "per_layer" and [tuple(w.shape) for w in model.W_dec] == [(128, 1, 32)] * 3
    clt = planted(store, tmp_path / "clt", "cross_layer").evaluation
    plt_nmse, clt_nmse = trained.evaluation["nmse"], clt["nmse"]
    print(f"held-out NMSE per layer after {STEPS} steps: per-layer {plt_nmse}, cross-layer {clt_nmse}")
    assert trained.evaluation["total_l0"] == pytest.approx(clt["total_l0"], abs=0.1)  # same L0 (k·L per token)
    assert plt_nmse[0] < 0.5 and abs(plt_nmse[0] - clt_nmse[0]) < 0.1
    assert all(c < p - 0.1 for p, c in zip(plt_nmse[1:], clt_nmse[1:], strict=True))


def test_a_per_layer_transcoder_learns_on_the_dense_path(store: str, tmp_path: Path) -> None:
    """jumprelu with the sparsity and pre-activation penalties: the dense path (decoder norms over its one block)."""
    cfg = config(store, tmp_path / "run", training_steps=60, eval_interval=60, checkpoint_interval=60,
                 learning_rate=3e-3, sparsity_lambda=1e-3, preactivation_coef=1e-4,
                 model=CLTConfig(num_features=64, activation_fn="jumprelu", decoders="per_layer"))  # fmt: skip
    result = train(cfg, progress=False)
    losses = reconstruction_losses(result.output_dir)
    print(f"jumprelu per-layer transcoder: held-out NMSE per layer {result.evaluation['nmse']}")
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert result.evaluation["nmse"][0] < 0.6


def test_clt_train_takes_the_decoders_from_a_flag_or_the_config(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--data", store, "--num-features", "32", "--activation-fn", "batchtopk", "--k", "2", "--batch-size",
              "128", "--holdout-fraction", "0.1", "--buffer-chunks", "2", "--training-steps", "3", "--eval-rows",
              "128", "-q"]  # fmt: skip
    assert main(["train", "--out", str(tmp_path / "flag"), "--decoders", "per_layer", *common]) == 0
    (tmp_path / "plt.yaml").write_text("model:\n  num_features: 32\n  decoders: per_layer\n")
    assert main(["train", "--config", str(tmp_path / "plt.yaml"), "--out", str(tmp_path / "yaml"), *common]) == 0
    assert main(["train", "--out", str(tmp_path / "clt"), *common]) == 0
    assert "trained 3 steps" in capsys.readouterr().out
    for run, decoders, targets in (("flag", "per_layer", [1, 1, 1]), ("yaml", "per_layer", [1, 1, 1]),
                                   ("clt", "cross_layer", [3, 2, 1])):  # fmt: skip
        final = tmp_path / run / "final"
        assert json.loads((final / "config.json").read_text())["decoders"] == decoders, run
        assert [w.shape[1] for w in load(final).model.W_dec] == targets, run
    with pytest.raises(SystemExit) as refused:
        main(["train", "--out", str(tmp_path / "bad"), "--decoders", "diagonal", *common[:2]])
    assert refused.value.code == 2 and "invalid choice: 'diagonal'" in capsys.readouterr().err


def test_a_per_layer_transcoder_converts_to_jumprelu_and_evaluates(trained: TrainResult, tmp_path: Path) -> None:
    report = convert(trained.final, tmp_path / "jumprelu", ConvertConfig(batches=4, eval_rows=1024), progress=False)
    converted = load(tmp_path / "jumprelu").model
    assert converted.config.decoders == "per_layer" and converted.config.activation_fn == "jumprelu"
    assert [tuple(w.shape) for w in converted.W_dec] == [(128, 1, 32)] * 3
    assert report["calibrated"]["mean_nmse"] < report["before"]["mean_nmse"] + 0.1
    held_out = evaluate_model(trained.final)
    assert held_out["decoders"] == "per_layer" and len(held_out["nmse"]) == 3
    assert held_out["mean_nmse"] == pytest.approx(trained.evaluation["mean_nmse"], abs=0.05)
