"""`clt serve`: circuit-tracer's graph viewer for a directory of graph files, offline (its CDN libraries vendored
in `assets/vendor/`), with the feature examples of `clt features` answered from their binary files."""

from clt_core.viewer.serve import FeatureFiles, ServeConfig, ViewerServer, find_frontend, offline_html, running, serve

__all__ = ["FeatureFiles", "ServeConfig", "ViewerServer", "find_frontend", "offline_html", "running", "serve"]
