"""Run inside circuit-tracer's own virtualenv (`make circuit-tracer-venv`; transformers 4.57): attribute one prompt.

Imports only circuit-tracer's environment and the standard library, never clt_core. `clt attribute`
(`clt_core.attribution.run`) writes a request JSON and runs `PYTHON ct_script.py REQUEST.json`; this script

1. loads `ReplacementModel.from_pretrained(hf_dir, transcoders, backend="nnsight", dtype=...)` (HF_HUB_OFFLINE is
   set by the caller; `transcoders` is the absolute path of our export, which circuit-tracer reads as a cache entry);
2. runs `attribute(token_ids, ...)` on the given ids (they start with our BOS: circuit-tracer keeps a leading special
   token and zeroes position 0's features and errors);
3. writes `graph/{slug}.json` + `graph/graph-metadata.json` (`create_graph_files`, what the viewer serves),
   `graph.safetensors` (adjacency, active/selected features, activations, tokens, logit targets; safe to load),
   optionally `graph.pt` (`Graph.to_pt`, a pickle only circuit-tracer's `Graph.from_pt` reads), and
   `attribution.json`: timings, logit targets, the checks below.

Checks (the numbers go to `attribution.json["checks"]`; the caller decides what passes):
- `replacement`: the model's own logits (a plain forward of the HF module) against the replacement model with error
  nodes, i.e. the same forward with every MLP output at positions >= 1 replaced by the CLT's reconstruction from the
  live MLP inputs plus the error vector attribution used (position 0 keeps the MLP output: circuit-tracer treats it
  as a constant). Exact up to float rounding.
- `completeness`: each logit node t's demeaned logit, logit_t - mean(logits), equals the sum of its adjacency row
  (feature, error and embedding nodes) + the direct effect of what is no node (the decoder bias b_dec at positions
  >= 1, the whole MLP output at position 0) + unselected features' direct effects. The frozen model
  (attention patterns and norm scales fixed, MLPs replaced) is linear in those sources, so this holds exactly; the
  constant part is computed with circuit-tracer's own backward (an AttributionContext whose "error" vectors are it).
- `interventions`: for the top features by probability-weighted direct effect on the logits, doubling the feature's
  activation in circuit-tracer's direct-effect mode (`feature_intervention(..., constrained_layers=all)`) changes
  the demeaned logits by the feature's adjacency column (circuit-tracer's own `verify_feature_edges`).
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    out = Path(request["out"])
    from circuit_tracer import ReplacementModel, attribute  # type: ignore[import-not-found]  # its venv only
    from circuit_tracer.utils.create_graph_files import create_graph_files  # type: ignore[import-not-found]

    device = request["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[request["dtype"]]
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model = ReplacementModel.from_pretrained(
        request["hf_dir"], request["transcoders"], backend="nnsight", device=torch.device(device), dtype=dtype
    )
    timings["load_s"] = time.perf_counter() - started
    timings["rss_bytes_before_attribute"] = _rss_bytes()
    timings["peak_rss_bytes_after_load"] = _peak_rss_bytes()
    ids = torch.tensor(request["token_ids"], dtype=torch.long, device=model.device)

    started = time.perf_counter()
    graph = attribute(
        ids,
        model,
        max_n_logits=request["max_n_logits"],
        desired_logit_prob=request["desired_logit_prob"],
        batch_size=request["batch_size"],
        max_feature_nodes=request["max_feature_nodes"],
        offload=request["offload"],
        verbose=request["verbose"],
    )
    timings["attribute_s"] = time.perf_counter() - started
    timings["peak_rss_bytes_after_attribute"] = _peak_rss_bytes()
    if torch.cuda.is_available():
        timings["cuda_peak_bytes"] = float(torch.cuda.max_memory_allocated())

    started = time.perf_counter()
    slug = request["slug"]
    create_graph_files(
        graph, slug, str(out / "graph"), scan=request["scan"],
        node_threshold=request["node_threshold"], edge_threshold=request["edge_threshold"],
    )  # fmt: skip
    if request["save_pt"]:
        graph.to_pt(str(out / "graph.pt"))
    logit_ids = torch.tensor([t.vocab_idx for t in graph.logit_targets], dtype=torch.long)
    save_file(
        {
            "adjacency_matrix": graph.adjacency_matrix.float().contiguous(),
            "active_features": graph.active_features.long().cpu().contiguous(),
            "selected_features": graph.selected_features.long().cpu().contiguous(),
            "activation_values": graph.activation_values.float().cpu().contiguous(),
            "input_tokens": graph.input_tokens.long().cpu().contiguous(),
            "logit_token_ids": logit_ids,
            "logit_probabilities": graph.logit_probabilities.float().cpu().contiguous(),
        },
        str(out / "graph.safetensors"),
    )
    timings["write_s"] = time.perf_counter() - started

    started = time.perf_counter()
    checks = run_checks(model, graph, ids, request["check_features"])
    timings["checks_s"] = time.perf_counter() - started
    timings["peak_rss_bytes"] = _peak_rss_bytes()
    n_layers, n_pos = graph.cfg.n_layers, len(graph.input_tokens)
    summary = {
        "slug": slug,
        "prompt": graph.input_string,
        "input_tokens": [model.tokenizer.decode([t]) for t in graph.input_tokens.tolist()],
        "token_ids": graph.input_tokens.tolist(),
        "logit_targets": [
            {"token": t.token_str, "id": t.vocab_idx, "probability": float(p)}
            for t, p in zip(graph.logit_targets, graph.logit_probabilities.tolist(), strict=True)
        ],
        "active_features": int(graph.active_features.shape[0]),
        "selected_features": int(graph.selected_features.shape[0]),
        "nodes": {
            "features": int(graph.selected_features.shape[0]),
            "errors": n_layers * n_pos,
            "tokens": n_pos,
            "logits": len(graph.logit_targets),
        },
        "scan": request["scan"],
        "device": str(model.device),
        "dtype": request["dtype"],
        "tied_embeddings": bool(model.embed_weight.data_ptr() == model.unembed_weight.data_ptr()),
        "timings": timings,
        "checks": checks,
    }
    (out / "attribution.json").write_text(json.dumps(summary, indent=2))


def _rss_bytes() -> float:
    """This process's resident set size now (Linux /proc; 0 elsewhere)."""
    try:
        return float(int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize())
    except OSError:
        return 0.0


def _peak_rss_bytes() -> float:
    """This process's peak resident set size so far (ru_maxrss is in KiB on Linux)."""
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def run_checks(model: Any, graph: Any, ids: torch.Tensor, n_check: int) -> dict[str, Any]:
    """The three checks of the module docstring, as numbers (errors are reported, not raised)."""
    checks: dict[str, Any] = {}
    hf = model._module  # the HF model nnsight wraps
    for name, check in [
        ("replacement", lambda: replacement_check(model, hf, ids)),
        ("completeness", lambda: completeness_check(model, hf, graph, ids)),
        ("interventions", lambda: intervention_check(model, graph, ids, n_check)),
    ]:
        try:
            checks[name] = check()
        except Exception as err:  # a check that cannot run is a finding, not a crash
            checks[name] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
    return checks


def _hook_modules(model: Any, hf: Any, layer: int) -> tuple[Any, str, Any]:
    """(feature input module, "input"|"output", feature output module) of `layer` in the plain HF module tree."""
    pattern_in, io = model._feature_input_pattern, model._feature_input_io
    return (
        model._resolve_attr(hf, pattern_in.format(layer=layer)),
        io,
        model._resolve_attr(hf, model._feature_output_pattern.format(layer=layer)),
    )


def _first(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


@torch.no_grad()
def own_forward(model: Any, hf: Any, ids: torch.Tensor, replace: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """Logits `[n_pos, vocab]` of a plain forward of the HF module, and its MLP outputs `[L, n_pos, d]`. With
    `replace` (`errors [L, n_pos, d]`), MLP outputs at positions >= 1 become the CLT's reconstruction from the live
    MLP inputs + errors: the replacement model with error nodes."""
    tc = model.transcoders
    n_layers = model.cfg.n_layers
    outputs: list[torch.Tensor | None] = [None] * n_layers
    features: list[torch.Tensor | None] = [None] * n_layers
    handles = []

    def record_input(layer: int, value: torch.Tensor) -> None:
        features[layer] = tc.encode_layer(value[0], layer)  # [n_pos, F]: activated, like attribution's encode

    def reconstruct(layer: int) -> torch.Tensor:
        recon = tc.b_dec[layer].expand(ids.shape[0], -1).clone()
        for source in range(layer + 1):
            acts = features[source]
            assert acts is not None
            acts = acts.clone()
            acts[0] = 0  # circuit-tracer zeroes position 0
            pos, feat = acts.nonzero(as_tuple=True)
            if not len(feat):
                continue
            dec = tc._get_decoder_vectors(source, feat)  # [n, L - source, d]
            recon.index_add_(0, pos, dec[:, layer - source] * acts[pos, feat, None].to(dec.dtype))
        return recon

    for layer in range(n_layers):
        module_in, io, module_out = _hook_modules(model, hf, layer)
        if replace is not None:
            if io == "input":
                handles.append(module_in.register_forward_pre_hook(lambda m, a, layer=layer: record_input(layer, a[0])))
            else:
                handles.append(
                    module_in.register_forward_hook(lambda m, a, o, layer=layer: record_input(layer, _first(o)))
                )

        def on_output(module: Any, args: Any, output: Any, layer: int = layer) -> Any:
            y = _first(output)
            outputs[layer] = y[0].detach().clone()
            if replace is None:
                return None
            new = y.clone()
            new[0, 1:] = (reconstruct(layer) + replace["errors"][layer].to(y.dtype))[1:]
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handles.append(module_out.register_forward_hook(on_output))
    try:
        logits = hf(ids[None]).logits[0]
    finally:
        for h in handles:
            h.remove()
    return logits, torch.stack([o for o in outputs if o is not None])


def replacement_check(model: Any, hf: Any, ids: torch.Tensor) -> dict[str, Any]:
    ctx = model.setup_attribution(ids)
    own, _ = own_forward(model, hf, ids)
    replaced, _ = own_forward(model, hf, ids, replace={"errors": ctx.error_vectors})
    traced = ctx.logits[0].to(own.dtype)
    scale = float(own.abs().max())
    return {
        "max_abs_logit_diff": float((replaced - own).abs().max()),
        "traced_vs_own_max_abs_diff": float((traced - own).abs().max()),
        "logit_scale": scale,
        "top_token_own": int(own[-1].argmax()),
        "top_token_replacement": int(replaced[-1].argmax()),
        "last_logits_own": own[-1].float().cpu().tolist()[:8],
    }


def completeness_check(model: Any, hf: Any, graph: Any, ids: torch.Tensor) -> dict[str, Any]:
    from circuit_tracer.attribution.targets import AttributionTargets  # type: ignore[import-not-found]

    ctx = model.setup_attribution(ids)
    own, mlp_out = own_forward(model, hf, ids)
    n_layers, n_pos = model.cfg.n_layers, ids.shape[0]
    constant = model.transcoders.b_dec[:, None].expand(n_layers, n_pos, -1).clone().to(ctx.error_vectors.dtype)
    constant[:, 0] = mlp_out[:, 0].to(constant.dtype)
    ctx.error_vectors = constant
    ctx.token_vectors = torch.zeros_like(ctx.token_vectors)
    logit_ids = torch.tensor([t.vocab_idx for t in graph.logit_targets], dtype=torch.long, device=model.device)
    targets = AttributionTargets(logit_ids, ctx.logits[0, -1], model.unembed_proj, model.tokenizer)
    n_logits = len(logit_ids)
    model.run_forward_pass(ids, n_logits, ctx)
    rows = (
        ctx.compute_batch(
            layers=torch.full((n_logits,), n_layers),
            positions=torch.full((n_logits,), n_pos - 1),
            inject_values=targets.logit_vectors,
            retain_graph=False,
        )
        .float()
        .cpu()
    )
    n_active = graph.active_features.shape[0]
    beta = rows[:, n_active : n_active + n_layers * n_pos].sum(-1)
    unselected = torch.ones(n_active, dtype=torch.bool)
    unselected[graph.selected_features.cpu()] = False
    missing = rows[:, :n_active][:, unselected].sum(-1)
    n_sources = graph.selected_features.shape[0] + (n_layers + 1) * n_pos
    graph_rows = graph.adjacency_matrix[-n_logits:, :n_sources].float()
    row_sum = graph_rows.sum(-1)
    last = own[-1].float().cpu()
    demeaned = last[logit_ids.cpu()] - last.mean()
    residual = demeaned - (row_sum + beta + missing)
    return {
        "demeaned_logits": demeaned.tolist(),
        "graph_row_sums": row_sum.tolist(),
        "constant_part": beta.tolist(),
        "unselected_features_part": missing.tolist(),
        "max_abs_residual": float(residual.abs().max()),
        "scale": float(demeaned.abs().max()),
        "all_features_selected": bool(not unselected.any()),
    }


def intervention_check(model: Any, graph: Any, ids: torch.Tensor, n_check: int) -> dict[str, Any]:
    if n_check <= 0 or graph.selected_features.numel() == 0:
        return {"checked": 0}
    n_logits = len(graph.logit_targets)
    n_features = graph.selected_features.shape[0]
    logit_rows = graph.adjacency_matrix[-n_logits:, :n_features].float()
    score = (graph.logit_probabilities.float().cpu()[:, None] * logit_rows.abs()).sum(0)
    top = torch.argsort(score, descending=True)[:n_check]
    logit_ids = torch.tensor([t.vocab_idx for t in graph.logit_targets], dtype=torch.long)
    base_logits, base_acts = model.get_activations(ids, apply_activation_function=False)
    base = base_logits[0, -1].float().cpu()
    base_demeaned = base[logit_ids] - base.mean()
    worst, scale, rows = 0.0, 0.0, []
    for node in top.tolist():
        layer, pos, feat = graph.active_features[graph.selected_features[node]].tolist()
        old = base_acts[layer, pos, feat]
        new_logits, _ = model.feature_intervention(
            ids, [(layer, pos, feat, old * 2)], constrained_layers=range(model.cfg.n_layers),
            apply_activation_function=False,
        )  # fmt: skip
        new = new_logits[0, -1].float().cpu()
        delta = (new[logit_ids] - new.mean()) - base_demeaned
        expected = graph.adjacency_matrix[-n_logits:, node].float()
        err = float((delta - expected).abs().max())
        worst, scale = max(worst, err), max(scale, float(expected.abs().max()))
        rows.append({"node": [layer, pos, feat], "expected": expected.tolist(), "observed": delta.tolist()})
    return {"checked": len(rows), "max_abs_error": worst, "scale": scale, "features": rows}


if __name__ == "__main__":
    main()
