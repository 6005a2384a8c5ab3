"""Time and memory of `clt attribute` end to end, and of circuit-tracer's bare `attribute()` call inside it.

    .venv/bin/python bench/attribute.py --model-dir RUN/jumprelu-XXXX            # SmolLM2: a 16-token prompt
    .venv/bin/python bench/attribute.py --model-dir DIR --tokens 16 --device cpu --max-feature-nodes 7500

End to end is one child process running what `clt attribute MODEL_DIR --prompt P` runs (the `clt` command when it
has `attribute`, else `clt_core.attribution.attribute` in a fresh interpreter): export (cached after the first run;
`--fresh-export` to time it), model view, tokenisation, and the circuit-tracer process (load, attribution, graph
files, checks). Its peak RSS is the largest of that process tree's (getrusage of the children: the bigger of our
process and circuit-tracer's). The bare call's time and peak RSS (after the model load, after `attribute()`) are
measured inside the circuit-tracer process (`attribution.json["timings"]`). The prompt is the start of Genesis cut to
`--tokens` tokens, BOS included, with the model's own tokenizer.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness "
    "was upon the face of the deep. And the Spirit of God moved upon the face of the waters."
)


def prompt_of(model_dir: Path, tokens: int, model: str | None) -> tuple[str, int]:
    """The first `tokens - 1` tokens of TEXT as text (the BOS makes `tokens`), and the count it tokenises to."""
    from transformers import AutoTokenizer

    from clt_core.attribution import AttributeConfig, language_model_dir, tokenize
    from clt_core.attribution.run import bos_token

    source = json.loads((model_dir / "source.json").read_text())
    store = source.get("store") or {}
    spec = model or store["model"]["name"]
    lm_dir = language_model_dir(spec)
    tokenizer = AutoTokenizer.from_pretrained(str(lm_dir))
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"][: tokens - 1]
    prompt = tokenizer.decode(ids)
    return prompt, len(tokenize(lm_dir, prompt, bos_token(AttributeConfig(), store, spec)))


def has_cli_command() -> bool:
    from clt_core.cli import _subcommands, build_parser

    return "attribute" in _subcommands(build_parser(plugins=False)).choices


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path, help="a JumpReLU model directory (or its export)")
    parser.add_argument("--tokens", type=int, default=16, help="prompt length in tokens, BOS included")
    parser.add_argument("--out", type=Path, help="output directory (default: a temporary one, removed)")
    parser.add_argument("--model", help="language model (default: the one in source.json)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-feature-nodes", type=int, default=7500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--check-features", type=int, default=0, help="intervention checks (timed apart)")
    parser.add_argument("--fresh-export", action="store_true", help="export again (time the export too)")
    args = parser.parse_args()

    prompt, n_tokens = prompt_of(args.model_dir, args.tokens, args.model)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-attribute-"))
    if args.fresh_export:
        shutil.rmtree(out / "transcoders", ignore_errors=True)
    options = {
        "prompt": prompt,
        "device": args.device,
        "dtype": args.dtype,
        "max_feature_nodes": args.max_feature_nodes,
        "batch_size": args.batch_size,
        "check_features": args.check_features,
        "slug": "bench",
        **({"model": args.model} if args.model else {}),
    }
    if has_cli_command():
        command = [str(Path(sys.executable).with_name("clt")), "attribute", str(args.model_dir), "--out", str(out)]
        for key, value in options.items():
            command += [f"--{key.replace('_', '-')}", str(value)]
        command.append("--overwrite")
    else:
        code = (
            "import sys, json; from clt_core.attribution import AttributeConfig, attribute, describe; "
            "r = attribute(sys.argv[1], sys.argv[2], AttributeConfig(**json.loads(sys.argv[3])), overwrite=True); "
            "print(describe(r))"
        )
        command = [sys.executable, "-c", code, str(args.model_dir), str(out), json.dumps(options)]
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if run.returncode != 0:
        sys.exit(f"clt attribute failed (exit {run.returncode}):\n{run.stdout[-2000:]}{run.stderr[-2000:]}")
    summary = json.loads((out / "attribution.json").read_text())
    t = summary["timings"]
    gib = 2**30
    print(f"model dir: {args.model_dir}   prompt: {n_tokens} tokens {prompt!r}")
    print(f"device {summary['device']}, dtype {summary['dtype']}; {summary['active_features']} active features, "
          f"{summary['selected_features']} in the graph, {len(summary['logit_targets'])} logits")  # fmt: skip
    print(f"clt attribute, end to end:   {wall:8.1f} s   peak RSS {peak / gib:6.2f} GiB (largest process)")
    load_peak, peak_after = t["peak_rss_bytes_after_load"] / gib, t["peak_rss_bytes_after_attribute"] / gib
    print(f"  circuit-tracer model load: {t['load_s']:8.1f} s   peak RSS {load_peak:6.2f} GiB")
    print(
        f"  bare attribute() call:     {t['attribute_s']:8.1f} s   peak RSS {peak_after:6.2f} GiB "
        f"(RSS before it {t['rss_bytes_before_attribute'] / gib:.2f})"
    )
    if "cuda_peak_bytes" in t:
        print(f"  CUDA peak memory:          {t['cuda_peak_bytes'] / gib:6.2f} GiB")
    print(f"  graph files: {t['write_s']:.1f} s; checks: {t['checks_s']:.1f} s")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
