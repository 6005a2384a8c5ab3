"""`clt serve DIR`: circuit-tracer's graph viewer over a graph directory, offline, with our feature examples.

The page is circuit-tracer's own frontend (`circuit_tracer/frontend/assets`, MIT), read where it is installed (see
`find_frontend`); only its `index.html` (and any other page) is changed on the way out: the libraries it loads from
CDNs become the copies in `assets/vendor/` (README there), and a Content-Security-Policy keeps the browser from
contacting anything but this server. Routes:

- `/data/X`, `/graph_data/X`: `DIR/X` (circuit-tracer's local server's mapping: `graph-metadata.json`, `SLUG.json`);
  with `--features`, a graph's `metadata.scan` is served as `./clt_features`, so the viewer asks this server for a
  node's examples;
- `/clt_features/N.json`: the record of feature `N = cantor(layer, index)`, read from the binary files of
  `clt features` (`features/index.json.gz`, `layer_L.bin`);
- `POST /save_graph/SLUG`: the viewer's Save button, its view state written into `DIR/SLUG.json` (`qParams`);
- `/_clt/...`: the vendored libraries; anything else: a file of the frontend.
"""

from __future__ import annotations

import contextlib
import gzip
import html
import ipaddress
import json
import logging
import math
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.util import find_spec
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import Field

from clt_core.config import Config
from clt_core.errors import ConfigError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
"""Our files the page loads (under `/_clt/`): the vendored libraries and the d3-jetpack shims."""
FRONTEND_ENV = "CLT_CIRCUIT_TRACER_FRONTEND"
INSTALLED_ASSETS = "circuit_tracer/frontend/assets"
METADATA_FILE = "graph-metadata.json"
FEATURES_SCAN = "./clt_features"
"""The scan the graphs are served with under `--features`: a `./` scan makes the viewer read `{scan}/{id}.json`
from the page's own server (not `./features/...`, which the viewer sends to Anthropic's CDN)."""
SAVE_LIMIT = 4 << 20
"""The largest Save request read (its body is the view state, a few KB)."""
COMPRESS_ABOVE = 1 << 20
"""Responses larger than this go gzip-compressed to a client that accepts it (graph files reach tens of MB)."""

_LIB = "https://transformer-circuits.pub/2025/attribution-graphs/static_js/lib/"
CDN_SCRIPTS: dict[str, tuple[str, ...]] = {
    _LIB + "hotserver-client-ws.js": (),  # the authors' live-reload client: nothing to reload here
    _LIB + "d3.js": ("vendor/d3.min.js",),
    _LIB + "jetpack_2024-07-20.js": ("jetpack-pre.js", "vendor/d3-jetpack.js", "jetpack-post.js"),
    _LIB + "npy_v0.js": (),  # reads .npy files, which only the frontend's `addition` demo page loads
    "https://unpkg.com/dagre@0.8.5/dist/dagre.min.js": ("vendor/dagre.min.js",),
    "https://unpkg.com/pako@2.1.0/dist/pako.min.js": ("vendor/pako_inflate.min.js",),
}
"""Each script circuit-tracer 0.5's pages load from a CDN, and the files of ours that replace it (in order)."""

CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
)
"""The page may load and fetch from this server only (its inline script and styles included)."""

_EXTERNAL_TAG = re.compile(
    r"""<script\b[^>]*?\bsrc\s*=\s*(["'])(https?:[^"']*)\1[^>]*>\s*</script\s*>"""
    r"""|<link\b[^>]*?\bhref\s*=\s*(["'])(https?:[^"']*)\3[^>]*>""",
    re.IGNORECASE,
)
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".md": "text/plain; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}


class ServeConfig(Config):
    """What `clt serve` serves, and where."""

    port: int = Field(8046, ge=0, le=65535)
    """Port to listen on (0: any free one)."""
    host: str = "127.0.0.1"
    """Address to listen on. Loopback by default; another address lets other machines open the viewer and save."""
    features: str | None = None
    """Output of `clt features` (or its `features/` directory): the examples shown for a graph's nodes."""
    frontend: str | None = None
    """circuit-tracer's `frontend/assets` directory; unset: $CLT_CIRCUIT_TRACER_FRONTEND, else the installed
    circuit_tracer's, else .venv-circuit-tracer's."""
    save: bool = True
    """Let the viewer's Save button write its view state (`qParams`) into DIR/SLUG.json."""


# --------------------------------------------------------------------------------------------------------------------
# What is served


def find_frontend(explicit: str | Path | None = None) -> Path:
    """circuit-tracer's `frontend/assets` directory: `explicit`, else `$CLT_CIRCUIT_TRACER_FRONTEND`, else the
    importable `circuit_tracer`'s (not imported: it needs torch and transformers), else the one installed in a
    `.venv-circuit-tracer` of the working directory or of this checkout (`make check-circuit-tracer`)."""
    given = explicit or os.environ.get(FRONTEND_ENV)
    if given:
        path = Path(given)
        if not (path / "index.html").is_file():
            where = "--frontend" if explicit else f"${FRONTEND_ENV}"
            raise ConfigError(f"{where} {path} has no index.html; give circuit-tracer's frontend/assets directory")
        return path
    candidates = []
    with contextlib.suppress(ImportError, ValueError):
        spec = find_spec("circuit_tracer")
        if spec is not None and spec.submodule_search_locations:
            candidates += [Path(p) / "frontend" / "assets" for p in spec.submodule_search_locations]
    for root in dict.fromkeys([Path.cwd(), Path(__file__).resolve().parents[2]]):
        candidates += sorted(root.glob(f".venv-circuit-tracer/lib/python3*/site-packages/{INSTALLED_ASSETS}"))
    for path in candidates:
        if (path / "index.html").is_file():
            return path
    raise ConfigError(
        "circuit-tracer's viewer files were not found: install circuit-tracer (`make check-circuit-tracer` puts it "
        f"in .venv-circuit-tracer), or point --frontend or ${FRONTEND_ENV} at its frontend/assets directory"
    )


def offline_html(text: str) -> tuple[str, list[str]]:
    """A page with each CDN script replaced by our copies (`CDN_SCRIPTS`), and the external scripts and stylesheets
    we have no copy of left out; those are returned too."""
    missing: list[str] = []

    def replace(match: re.Match[str]) -> str:
        url = match.group(2) or match.group(4)
        if match.group(2) and url in CDN_SCRIPTS:
            return "".join(f"<script src='/_clt/{html.escape(p)}'></script>" for p in CDN_SCRIPTS[url])
        missing.append(url)
        return "<!-- clt serve: an external resource with no offline copy was left out -->"

    return _EXTERNAL_TAG.sub(replace, text), missing


def load_graph_dir(directory: Path) -> list[str]:
    """The slugs of the graphs in `directory` (as circuit-tracer's `create_graph_files` writes it), checked."""
    if not directory.is_dir():
        raise ConfigError(f"graph directory {directory} does not exist")
    hint = f"write graphs into it with circuit-tracer's create_graph_files(graph, slug, output_path='{directory}')"
    metadata_path = directory / METADATA_FILE
    if not metadata_path.is_file():
        raise ConfigError(f"{directory} holds no graph files (no {METADATA_FILE}); {hint}")
    try:
        metadata = json.loads(metadata_path.read_text())
        slugs = [str(g["slug"]) for g in metadata["graphs"]]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{metadata_path}: not a graph list ({err}); {hint}") from None
    present = []
    for slug in slugs:
        with contextlib.suppress(PermissionError):  # a slug naming a file out of the directory is not served
            if _inside(directory, f"{slug}.json") is not None:
                present.append(slug)
    if not present:
        listed = "lists no graphs" if not slugs else f"lists {len(slugs)} graph(s), none of whose SLUG.json is there"
        raise ConfigError(f"{metadata_path} {listed}; {hint}")
    return present


def unpair(feature_id: int) -> tuple[int, int]:
    """`(layer, index)` of the viewer's feature id `cantor(layer, index)` (its `util.cantorUnpair`)."""
    w = (math.isqrt(8 * feature_id + 1) - 1) // 2
    index = feature_id - w * (w + 1) // 2
    return w - index, index


class FeatureFiles:
    """The binary feature files of `clt features` (`index.json.gz`, `layer_L.bin`), the index read once."""

    def __init__(self, path: str | Path) -> None:
        from clt_core.features.viewer_format import INDEX_FILE, read_index

        path = Path(path)
        directory = path / "features" if (path / "features" / INDEX_FILE).is_file() else path
        if not (directory / INDEX_FILE).is_file():
            raise ConfigError(
                f"--features {path} holds no feature files (no features/{INDEX_FILE}); give the --out directory of "
                "`clt features`"
            )
        try:
            index = read_index(directory)
            self.layers = {int(layer): (directory / e["filename"], list(e["offsets"])) for layer, e in index.items()}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{directory / INDEX_FILE}: not a feature index ({err})") from None
        self.directory = directory

    @property
    def count(self) -> int:
        return sum(len(offsets) - 1 for _, offsets in self.layers.values())

    def record(self, layer: int, index: int) -> dict[str, Any] | None:
        """Feature `index` of `layer` as `clt features` wrote it (`read_feature`'s reading); None if there is none."""
        from clt_core.features.viewer_format import decode_record

        if layer not in self.layers or not 0 <= index < len(self.layers[layer][1]) - 1:
            return None
        path, offsets = self.layers[layer]
        with open(path, "rb") as fh:
            fh.seek(offsets[index])
            return decode_record(fh.read(offsets[index + 1] - offsets[index]))


def _inside(root: Path, relative: str) -> Path | None:
    """The file `relative` (a URL path, `/`-separated, already unquoted) names under `root`; None if it is not a
    file there. Raises PermissionError for a path that would leave `root` (`..`, backslashes, NUL)."""
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if any(p == ".." or "\\" in p or "\x00" in p for p in parts):
        raise PermissionError(relative)
    base = root.resolve()
    path = base.joinpath(*parts).resolve()
    if not path.is_relative_to(base):  # a symbolic link out of `root`
        raise PermissionError(relative)
    return path if path.is_file() else None


@dataclass
class Site:
    """Everything a request handler reads: the directories and the checked configuration."""

    graphs: Path
    frontend: Path
    features: FeatureFiles | None
    save: bool
    allowed_hosts: frozenset[str] | None
    """Host header values accepted (None: any); loopback serving refuses others (DNS rebinding)."""
    _cache: dict[Path, tuple[tuple[int, int], bytes]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def graph_bytes(self, path: Path) -> bytes:
        """A data file; a graph's JSON with its scan pointed at this server under `--features` (cached)."""
        if self.features is None or path.suffix != ".json" or path.name == METADATA_FILE:
            return path.read_bytes()
        stat = path.stat()
        key = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._cache.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        raw = path.read_bytes()
        try:
            graph = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(graph, dict) and isinstance(graph.get("metadata"), dict):
            graph["metadata"]["clt_original_scan"] = graph["metadata"].get("scan")
            graph["metadata"]["scan"] = FEATURES_SCAN
            raw = json.dumps(graph, separators=(",", ":")).encode()
        with self._lock:
            self._cache = {path: (key, raw)}  # one graph is looked at at a time: keep the last only
        return raw


# --------------------------------------------------------------------------------------------------------------------
# The server


class _Handler(BaseHTTPRequestHandler):
    server_version = "clt-serve"
    protocol_version = "HTTP/1.1"

    def __init__(self, *args: Any, site: Site, **kwargs: Any) -> None:
        self.site = site
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args: Any) -> None:  # BaseHTTPRequestHandler's signature
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def do_POST(self) -> None:
        self.close_connection = True  # a refusal leaves the body unread: the connection cannot carry another request
        try:
            if not self._host_ok():
                return
            path = unquote(urlsplit(self.path).path)
            if not path.startswith("/save_graph/"):
                return self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: {path}")
            self._save(path.removeprefix("/save_graph/"))
        except Exception as err:  # a bug must not kill the server thread silently
            log.exception("POST %s failed", self.path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(err).__name__}: {err}")

    # ----------------------------------------------------------------------------------------------------------------

    def _answer(self, head: bool) -> None:
        try:
            if not self._host_ok(head):
                return
            path = unquote(urlsplit(self.path).path)
            status, body, ctype = self._route(path)
            self._send(status, body, ctype, head=head)
        except PermissionError:
            self._error(HTTPStatus.FORBIDDEN, "path outside the served directories", head)
        except Exception as err:
            log.exception("GET %s failed", self.path)
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(err).__name__}: {err}", head)

    def _route(self, path: str) -> tuple[HTTPStatus, bytes, str]:
        site = self.site
        if path in ("/", "/index.html"):
            path = "/index.html"
        for prefix in ("/data/", "/graph_data/"):
            if path.startswith(prefix):
                file = _inside(site.graphs, path.removeprefix(prefix))
                if file is None:
                    return self._missing(f"no file {path.removeprefix(prefix)} in the graph directory")
                return HTTPStatus.OK, site.graph_bytes(file), _content_type(file)
        if path.startswith(FEATURES_SCAN[1:] + "/"):
            return self._feature(path.removeprefix(FEATURES_SCAN[1:] + "/"))
        root, relative = (ASSETS, path.removeprefix("/_clt/")) if path.startswith("/_clt/") else (site.frontend, path)
        file = _inside(root, relative)
        if file is None and path == "/favicon.ico":  # the frontend has none: no error in the browser's console
            return HTTPStatus.NO_CONTENT, b"", "image/x-icon"
        if file is None:
            return self._missing(f"not found: {path}")
        body = file.read_bytes()
        if file.suffix == ".html":
            text, _ = offline_html(body.decode("utf-8"))
            body = text.encode()
        return HTTPStatus.OK, body, _content_type(file)

    def _feature(self, name: str) -> tuple[HTTPStatus, bytes, str]:
        features = self.site.features
        if features is None:
            return self._missing("clt serve was started without --features: no feature examples to show")
        stem, dot, suffix = name.partition(".")
        if not (dot and suffix == "json" and stem.isdigit()):
            return self._missing(f"not a feature: {name}")
        layer, index = unpair(int(stem))
        record = features.record(layer, index)
        if record is None:
            return self._missing(f"no feature {index} of layer {layer} in {features.directory}")
        return HTTPStatus.OK, json.dumps(record, separators=(",", ":")).encode(), "application/json"

    def _save(self, slug: str) -> None:
        site = self.site
        if not site.save:
            return self._error(HTTPStatus.FORBIDDEN, "saving is off (clt serve --no-save)")
        if self.headers.get_content_type() != "application/json":
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "expected application/json")
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.headers.get("Host"):
            return self._error(HTTPStatus.FORBIDDEN, "cross-origin save refused")
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= SAVE_LIMIT:
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"expected 1 to {SAVE_LIMIT} bytes, got {length}")
        try:
            q_params = json.loads(self.rfile.read(length))["qParams"]
        except (ValueError, KeyError, TypeError):
            return self._error(HTTPStatus.BAD_REQUEST, "expected a JSON object with qParams")
        try:
            file = _inside(site.graphs, f"{slug}.json")
        except PermissionError:
            return self._error(HTTPStatus.FORBIDDEN, "path outside the graph directory")
        if file is None or "/" in slug:  # a graph of DIR itself, as the viewer lists them
            return self._error(HTTPStatus.NOT_FOUND, f"no graph {slug} in the graph directory")
        graph = json.loads(file.read_text())
        graph["qParams"] = q_params
        tmp = file.with_name(f".{file.name}.tmp")
        tmp.write_text(json.dumps(graph, indent=2))
        os.replace(tmp, file)
        log.info("saved the view of %s", slug)
        self._send(HTTPStatus.OK, json.dumps({"saved": slug}).encode(), "application/json")

    # ----------------------------------------------------------------------------------------------------------------

    def _host_ok(self, head: bool = False) -> bool:
        allowed = self.site.allowed_hosts
        host = (self.headers.get("Host") or "").lower()
        if allowed is None or host in allowed:
            return True
        self._error(HTTPStatus.FORBIDDEN, f"unexpected Host header {host!r}", head)
        return False

    def _missing(self, message: str) -> tuple[HTTPStatus, bytes, str]:
        return HTTPStatus.NOT_FOUND, json.dumps({"error": message}).encode(), "application/json"

    def _error(self, status: HTTPStatus, message: str, head: bool = False) -> None:
        self._send(status, json.dumps({"error": message}).encode(), "application/json", head=head)

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, head: bool = False) -> None:
        compress = len(body) > COMPRESS_ABOVE and "gzip" in (self.headers.get("Accept-Encoding") or "")
        if compress:
            body = gzip.compress(body, compresslevel=3)
        self.send_response(status)
        if compress:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Type", ctype)
        if status != HTTPStatus.NO_CONTENT:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _content_type(path: Path) -> str:
    return _TYPES.get(path.suffix.lower(), "application/octet-stream")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class ViewerServer:
    """The viewer's HTTP server for a graph directory, bound at construction; `start` serves from a thread (tests),
    `serve_forever` in the caller's; `close` stops either."""

    def __init__(self, directory: str | Path, config: ServeConfig | None = None) -> None:
        config = config or ServeConfig()
        directory = Path(directory)
        self.slugs = load_graph_dir(directory)
        self.frontend = find_frontend(config.frontend)
        _, missing = offline_html((self.frontend / "index.html").read_text())
        for url in missing:
            log.warning("%s loads %s, which clt serve has no offline copy of: left out", self.frontend, url)
        self.features = FeatureFiles(config.features) if config.features else None
        self.site = Site(directory, self.frontend, self.features, config.save, allowed_hosts=None)
        host = config.host.strip("[]")
        server_class = _Server6 if ":" in host else _Server
        try:
            self.httpd = server_class((host, config.port), partial(_Handler, site=self.site))
        except OSError as err:
            raise ConfigError(
                f"cannot listen on {config.host}:{config.port} ({err.strerror or err}); pick another --port "
                "(0: any free one) or --host"
            ) from None
        self.port: int = self.httpd.server_address[1]
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        shown = f"[{shown}]" if ":" in shown else shown
        self.url = f"http://{shown}:{self.port}/"
        if _is_loopback(host):  # only the names of this machine: a page of another site cannot rebind to it
            names = {"localhost", "127.0.0.1", "[::1]", shown.lower()}
            self.site.allowed_hosts = frozenset({*names, *(f"{n}:{self.port}" for n in names)})
        self._thread: threading.Thread | None = None

    def describe(self) -> str:
        graphs = f"{len(self.slugs)} graph{'s' if len(self.slugs) != 1 else ''}"
        if self.features is None:
            examples = "no feature examples (give --features: the --out of `clt features`)"
        else:
            examples = f"the examples of {self.features.count:,} features in {self.features.directory}"
        return f"circuit-tracer's viewer for {graphs} with {examples} at {self.url}"

    def start(self) -> ViewerServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="clt-serve", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.httpd.server_close()

    def __enter__(self) -> ViewerServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def running(directory: str | Path, config: ServeConfig | None = None) -> Iterator[ViewerServer]:
    """A viewer server serving from a thread for the `with` block."""
    with ViewerServer(directory, config) as server:
        yield server.start()


def serve(directory: str | Path, config: ServeConfig | None = None) -> None:
    """Serve the viewer for `directory` until Ctrl-C, then stop cleanly."""
    server = ViewerServer(directory, config)
    print(server.describe(), flush=True)
    print(f"open {server.url} in a browser; Ctrl-C stops the server", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.close()
