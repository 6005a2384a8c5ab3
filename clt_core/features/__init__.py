"""Per-feature example data for circuit-tracer's graph viewer (`clt features`): top-activating and quantile-binned
contexts, histograms, frequencies and logits, streamed over a text with bounded memory."""

from clt_core.features.collect import FeatureCollector, FeatureResult, LayerState
from clt_core.features.logits import decoder_directions, final_norm, logit_tokens
from clt_core.features.run import FeatureEncoder, FeaturesConfig, collect_features, describe, write_features
from clt_core.features.viewer_format import cantor, decode_record, encode_record, read_feature, read_index

__all__ = [
    "FeatureCollector",
    "FeatureEncoder",
    "FeatureResult",
    "FeaturesConfig",
    "LayerState",
    "cantor",
    "collect_features",
    "decode_record",
    "decoder_directions",
    "describe",
    "encode_record",
    "final_norm",
    "logit_tokens",
    "read_feature",
    "read_index",
    "write_features",
]
