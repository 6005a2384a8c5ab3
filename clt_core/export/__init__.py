"""Export of trained models to the formats other tools load (circuit-tracer)."""

from clt_core.export.circuit_tracer import export_circuit_tracer, folded_weights, load_export

__all__ = ["export_circuit_tracer", "folded_weights", "load_export"]
