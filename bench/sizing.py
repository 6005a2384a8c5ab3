"""What a SmolLM2-135M CLT gains from more training tokens and a larger k, and the per-layer-transcoder baseline beside
it: the runs behind docs/sizing.md, each end to end (train live from the model, convert to JumpReLU, evaluate).

    .venv/bin/python bench/sizing.py --work runs/sizing [--runs clt-k32-250k,plt-k32-250k]

Every run is configs/smollm2-clt.yaml with the training tokens, k and decoders its name gives (`RUNS`). All of them
hold out the same first 16,384 tokens of the corpus (their OUT/held_out stores hold the same rows) and are scored
there: reconstruction on the held-out rows the conversion did not fit its thresholds on, spliced-in CE/KL/top-1 on
the held-out rows' text (their token ids decoded, then packed into windows again). Each stage is skipped where its
output exists, so an interrupted bench goes on where it stopped (training with --resume). A run's wall time spans its
first write (`held_out/`) to its last (`final/`): for a resumed run, the gap and the redone steps included.

Prints the table and writes WORK/sizing.json, the plots WORK/sizing-tokens.png and WORK/sizing-k.png (one quantity
per panel) and WORK/sizing-curves.png (held-out NMSE during training against tokens).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2-clt.yaml"
SPLICED_TOKENS = 8192


@dataclass(frozen=True)
class Run:
    tokens: int
    k: int
    decoders: str = "cross_layer"

    @property
    def label(self) -> str:
        return "CLT" if self.decoders == "cross_layer" else "per-layer"


RUNS = {
    "clt-k32-3m": Run(3_002_368, 32),  # the config's own run: 733 steps of 4,096
    "clt-k32-1m": Run(1_003_520, 32),
    "clt-k32-250k": Run(262_144, 32),
    "clt-k16-250k": Run(262_144, 16),
    "clt-k64-250k": Run(262_144, 64),
    "plt-k32-250k": Run(262_144, 32, "per_layer"),
    "plt-k32-3m": Run(3_002_368, 32, "per_layer"),
}


def clt(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "clt_core.cli", *args], check=True)


def train(out: Path, run: Run) -> None:
    if (out / "final" / "config.json").exists():
        return
    clt("train", "--config", str(CONFIG), "--out", str(out), "--resume", "--progress-every", "60",
        "--tokens", str(run.tokens), "--k", str(run.k), "--decoders", run.decoders)  # fmt: skip
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # GBs each at F=2048


def held_out_text(run_dir: Path, path: Path) -> Path:
    """The text of a run's held-out rows (every run holds out the same ones), for the spliced-in evaluation."""
    if not path.exists():
        from clt_core.data.store import ActivationStore
        from clt_core.lm.loading import resolve_model

        store = ActivationStore.open(str(run_dir / "held_out"))
        ids = store.read(0, store.num_rows).token_ids.tolist()
        tokenizer = resolve_model(store.info.model["name"]).tokenizer
        path.write_text(tokenizer.decode(ids, skip_special_tokens=True))
    return path


def evaluate(out: Path, text: Path) -> dict[str, Any]:
    if not (out / "jumprelu" / "config.json").exists():
        clt("convert", str(out / "final"), "--out", str(out / "jumprelu"), "--overwrite", "--quiet")
    report = out / "evaluation" / "evaluation.json"
    if not report.exists():
        clt("evaluate", str(out / "jumprelu"), "--out", str(out / "evaluation"), "--spliced", "--text", str(text),
            "--tokens", str(SPLICED_TOKENS), "--quiet")  # fmt: skip
    return json.loads(report.read_text())


def summary(name: str, run: Run, out: Path, evaluation: dict[str, Any]) -> dict[str, Any]:
    rec, spliced = evaluation["reconstruction"], evaluation["spliced"]
    evals = [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval/mean_nmse" in m]
    started = min((out / name).stat().st_mtime for name in ("held_out", "train_config.yaml"))  # its first writes
    hours = ((out / "final").stat().st_mtime - started) / 3600
    return {
        "name": name,
        "decoders": run.decoders,
        "tokens": run.tokens,
        "k": run.k,
        "train_hours": hours,
        "nmse": rec["mean_nmse"],
        "l0_per_layer": rec["total_l0"] / len(rec["l0"]),
        "dead_fraction": rec["dead_fraction"],
        "ce_recovered": spliced["ce_recovered"],
        "kl_per_token": spliced["kl_per_token"],
        "top1_agreement": spliced["top1_agreement"],
        "batchtopk_nmse": evals[-1]["eval/mean_nmse"] if evals else None,
        "curve": [(m["step"], m["eval/mean_nmse"]) for m in evals],
    }


PANELS = (
    ("nmse", "held-out NMSE"),
    ("ce_recovered", "CE loss recovered"),
    ("kl_per_token", "KL (nats/token)"),
    ("top1_agreement", "top-1 agreement"),
)


def plot(rows: list[dict[str, Any]], axis: str, keep: Any, path: Path, xlabel: str) -> None:
    chosen = [r for r in rows if keep(r)]
    if not chosen:
        return
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.4), constrained_layout=True)
    for ax, (key, title) in zip(axes, PANELS, strict=True):
        for decoders, style in (("cross_layer", "o-"), ("per_layer", "s--")):
            points = sorted((r[axis], r[key]) for r in chosen if r["decoders"] == decoders)
            if points:
                ax.plot(*zip(*points, strict=True), style, label="CLT" if decoders == "cross_layer" else "per-layer")
        ax.set_xscale("log", base=2 if axis == "k" else 10)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(rows: list[dict[str, Any]], path: Path, batch_size: int = 4096) -> None:
    """Held-out NMSE (BatchTopK, training's evaluations) against training tokens, one line per run."""
    fig, ax = plt.subplots(figsize=(6, 3.6), constrained_layout=True)
    for r in sorted(rows, key=lambda r: -r["tokens"]):
        if r["curve"]:
            steps, nmse = zip(*r["curve"], strict=True)
            ax.plot([s * batch_size for s in steps], nmse, ".-", label=f"{r['name']}")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out NMSE (BatchTopK)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="one directory per run, and the report")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the finished runs")
    args = parser.parse_args()
    names = [n for n in args.runs.split(",") if n]
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        parser.error(f"unknown runs {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        out = args.work / name
        if not args.report_only:
            train(out, RUNS[name])
        if not (out / "final" / "config.json").exists():
            continue
        text = held_out_text(out, args.work / "held_out.txt")
        rows.append(summary(name, RUNS[name], out, evaluate(out, text)))
    (args.work / "sizing.json").write_text(json.dumps(rows, indent=2))
    plot(rows, "tokens", lambda r: r["k"] == 32, args.work / "sizing-tokens.png", "training tokens (k = 32)")
    plot(rows, "k", lambda r: r["tokens"] == 262_144, args.work / "sizing-k.png", "k per layer (262,144 tokens)")
    plot_curves(rows, args.work / "sizing-curves.png")
    print(f"\n{'run':14} {'tokens':>10} {'k':>3} {'hours':>6} {'NMSE':>7} {'L0/layer':>8} {'dead':>6} "
          f"{'CE rec.':>7} {'KL':>6} {'top-1':>6} {'BatchTopK NMSE':>14}")  # fmt: skip
    for r in rows:
        btk = f"{r['batchtopk_nmse']:.4f}" if r["batchtopk_nmse"] is not None else "-"
        print(f"{r['name']:14} {r['tokens']:>10,} {r['k']:>3} {r['train_hours']:>6.2f} {r['nmse']:>7.4f} "
              f"{r['l0_per_layer']:>8.1f} {r['dead_fraction']:>6.1%} {r['ce_recovered']:>7.3f} "
              f"{r['kl_per_token']:>6.3f} {r['top1_agreement']:>6.1%} {btk:>14}")  # fmt: skip


if __name__ == "__main__":
    main()
