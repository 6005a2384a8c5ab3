"""Small inputs for `clt serve`'s tests: a graph directory as circuit-tracer's `create_graph_files` writes it (the
schema of `circuit_tracer/frontend/graph_models.py`, built by hand), and a `clt features` output directory written
with `clt_core.features`' own writers, no model needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from clt_core.features import cantor
from clt_core.features.viewer_format import LayerFileWriter, write_index

LAYERS, FEATURES = 2, 8
PROMPT = ["<bos>", "The", " cat", " sat"]
GRAPH_FEATURES = [(0, 3, 1), (1, 5, 2), (1, 0, 3)]
"""The graph's feature nodes: (layer, feature index, position)."""
SLUG = "tiny-cat"


def feature_record(layer: int, index: int) -> dict[str, Any]:
    """The record `clt features` would write for feature `index` of `layer` (made-up values, unique tokens)."""
    token = f" zebra{layer}x{index}"
    acts = [0.0, 0.5, 2.0 + index / 10, 0.25]
    example = {"tokens": ["<bos>", "A", token, "!"], "tokens_acts_list": acts, "train_token_ind": 2,
               "is_repeated_datapoint": False}  # fmt: skip
    return {
        "transcoder_id": "tiny-clt",
        "index": index,
        "layer": layer,
        "examples_quantiles": [
            {"quantile_name": "Top activations", "examples": [example]},
            {"quantile_name": "Interval 1 (0.250 to 2.000)", "examples": [{**example, "is_repeated_datapoint": True}]},
        ],
        "top_logits": [f" up{layer}x{index}", " more"],
        "bottom_logits": [f" down{layer}x{index}", " less"],
        "act_min": 0.25,
        "act_max": max(acts),
        "quantile_values": [0.25 + (max(acts) - 0.25) * q / 99 for q in range(100)],
        "histogram": [1.0, 0.0, 1.0, 1.0],
        "activation_frequency": 0.125,
    }


def write_feature_dir(out: Path) -> Path:
    """`out` as `clt features --out out` leaves it: `features/index.json.gz` and `features/layer_L.bin`."""
    directory = out / "features"
    directory.mkdir(parents=True)
    offsets = {}
    for layer in range(LAYERS):
        writer = LayerFileWriter(directory / f"layer_{layer}.bin")
        for index in range(FEATURES):
            writer.write(feature_record(layer, index))
        offsets[layer] = writer.close()
    write_index(directory, offsets)
    return out


def graph(slug: str = SLUG, scan: str = "tiny-clt") -> dict[str, Any]:
    """A graph JSON as `create_graph_files` writes it: embeddings, CLT features, one error node and two logits."""

    def node(node_id: str, feature: int, layer: str, pos: int, kind: str, js_id: str, **extra: Any) -> dict[str, Any]:
        return {"node_id": node_id, "feature": feature, "layer": layer, "ctx_idx": pos, "feature_type": kind,
                "token_prob": 0.0, "is_target_logit": False, "run_idx": 0, "reverse_ctx_idx": 0, "jsNodeId": js_id,
                "clerp": "", "influence": 0.2, "activation": None, **extra}  # fmt: skip

    vocab = [1, 450, 6635, 3290]
    nodes = [node(f"E_{v}_{p}", p, "E", p, "embedding", f"E_{v}-{p}") for p, v in enumerate(vocab)]
    for i, (layer, index, pos) in enumerate(GRAPH_FEATURES):
        nodes.append(node(f"{layer}_{index}_{pos}", cantor(layer, index), str(layer), pos, "cross layer transcoder",
                          f"{layer}_{index}-0", influence=0.1 + i / 10, activation=1.5 + i))  # fmt: skip
    nodes.append(node("0_1_3", -1, "1", 3, "mlp reconstruction error", "1_3-0"))
    top = str(LAYERS + 1)
    for i, (token, vocab_idx, p) in enumerate([(" on", 373, 0.6), (" down", 1623, 0.2)]):
        nodes.append(node(f"{top}_{vocab_idx}_3", vocab_idx, top, 3, "logit", f"L_{vocab_idx}-3", token_prob=p,
                          is_target_logit=i == 0, clerp=f'Output "{token}" (p={p:.3f})'))  # fmt: skip
    links = [("E_450_1", "0_3_1", 0.8), ("E_6635_2", "1_5_2", 0.6), ("0_3_1", "1_5_2", 0.5), ("1_5_2", "1_0_3", 0.4),
             ("0_3_1", "1_0_3", -0.2), ("1_0_3", f"{top}_373_3", 0.9), ("0_1_3", f"{top}_373_3", 0.1),
             ("E_3290_3", f"{top}_1623_3", 0.3), ("1_5_2", f"{top}_1623_3", -0.3)]  # fmt: skip
    metadata = {"slug": slug, "scan": scan, "transcoder_list": [], "prompt_tokens": PROMPT,
                "prompt": "".join(PROMPT[1:]), "node_threshold": 0.8, "schema_version": 1}  # fmt: skip
    return {
        "metadata": metadata,
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": [{"source": s, "target": t, "weight": w} for s, t, w in links],
    }


def write_graph_dir(out: Path, slugs: tuple[str, ...] = (SLUG,)) -> Path:
    """A graph directory: `SLUG.json` per graph and `graph-metadata.json` listing their metadata."""
    out.mkdir(parents=True, exist_ok=True)
    graphs = []
    for slug in slugs:
        g = graph(slug)
        (out / f"{slug}.json").write_text(json.dumps(g, indent=2))
        graphs.append(g["metadata"])
    (out / "graph-metadata.json").write_text(json.dumps({"graphs": graphs}, indent=2))
    return out
