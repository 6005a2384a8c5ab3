"""Evaluation of trained models: held-out reconstruction, spliced-in CE/KL on real text, plots."""

from clt_core.evaluate.evaluation import EvaluateConfig, describe, evaluate
from clt_core.evaluate.spliced import CLTReplacement, SplicedRunner, spliced_metrics

__all__ = ["CLTReplacement", "EvaluateConfig", "SplicedRunner", "describe", "evaluate", "spliced_metrics"]
