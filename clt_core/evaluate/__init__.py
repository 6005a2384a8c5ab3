"""Evaluation of trained models: held-out reconstruction, spliced-in CE/KL on real text, plots."""

from clt_core.evaluate.evaluation import EvaluateConfig, describe, evaluate
from clt_core.evaluate.plots import plot_feature_density, plot_layer_metrics, plot_thresholds, plot_training_curves
from clt_core.evaluate.reconstruction import evaluate_model
from clt_core.evaluate.spliced import CLTReplacement, SplicedRunner, spliced_metrics, zero_replacement

__all__ = [
    "CLTReplacement",
    "EvaluateConfig",
    "SplicedRunner",
    "describe",
    "evaluate",
    "evaluate_model",
    "plot_feature_density",
    "plot_layer_metrics",
    "plot_thresholds",
    "plot_training_curves",
    "spliced_metrics",
    "zero_replacement",
]
