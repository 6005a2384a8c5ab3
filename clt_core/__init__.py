"""clt-pipeline core library: activation stores, Cross-Layer Transcoders, training, conversion and export."""

__version__ = "0.1.0"
