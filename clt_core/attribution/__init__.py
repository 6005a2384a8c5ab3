"""circuit-tracer attribution graphs of our CLTs (`clt attribute`): prepared here, computed in circuit-tracer's own
virtualenv by `ct_script.py` (see docs/attribution.md)."""

from clt_core.attribution.run import (
    PYTHON_ENV,
    AttributeConfig,
    AttributeResult,
    attribute,
    circuit_tracer_model_dir,
    circuit_tracer_python,
    describe,
    language_model_dir,
    tokenize,
)

__all__ = [
    "PYTHON_ENV",
    "AttributeConfig",
    "AttributeResult",
    "attribute",
    "circuit_tracer_model_dir",
    "circuit_tracer_python",
    "describe",
    "language_model_dir",
    "tokenize",
]
