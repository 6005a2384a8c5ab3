"""BatchTopK/TopK → JumpReLU conversion: per-feature threshold estimation and layer-wise L0 calibration."""

from clt_core.convert.calibrate import l0_per_layer, layer_scales
from clt_core.convert.converter import ConvertConfig, convert, describe, jumprelu_model
from clt_core.convert.theta import ESTIMATORS, ThresholdStats, threshold_stats

__all__ = [
    "ESTIMATORS",
    "ConvertConfig",
    "ThresholdStats",
    "convert",
    "describe",
    "jumprelu_model",
    "l0_per_layer",
    "layer_scales",
    "threshold_stats",
]
