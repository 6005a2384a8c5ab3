"""Export of trained models to the formats other tools load: circuit-tracer's cross-layer transcoder files (its
transcoder-set files for a per-layer model), with the training normalisation folded into the weights so they work on
raw activations (and load back as a native model)."""

from clt_core.export.circuit_tracer import (
    circuit_tracer_hooks,
    export_circuit_tracer,
    fold_normalization,
    load_circuit_tracer,
)

__all__ = ["circuit_tracer_hooks", "export_circuit_tracer", "fold_normalization", "load_circuit_tracer"]
