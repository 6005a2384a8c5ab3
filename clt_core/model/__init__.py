"""The cross-layer transcoder model: architecture config, module, activations, sparse decoding and losses."""

from clt_core.model.clt import CLTOutput, CrossLayerTranscoder
from clt_core.model.config import CLTConfig
from clt_core.model.losses import LossTerms, clt_loss
from clt_core.model.parallel import FeatureShards

__all__ = ["CLTConfig", "CLTOutput", "CrossLayerTranscoder", "FeatureShards", "LossTerms", "clt_loss"]
