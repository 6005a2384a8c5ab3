"""`clt serve`: circuit-tracer's viewer served offline for a graph directory, with `clt features`' examples answered
from their binary files; loopback only by default, no path out of the served directories, one-line errors."""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from viewer_fixtures import FEATURES, LAYERS, SLUG, feature_record, graph, write_feature_dir, write_graph_dir

from clt_core.errors import ConfigError
from clt_core.features import cantor, read_feature
from clt_core.viewer import ServeConfig, ViewerServer, find_frontend, offline_html, running
from clt_core.viewer.serve import CDN_SCRIPTS, FEATURES_SCAN, FRONTEND_ENV, unpair

EXTERNAL = re.compile(r"""\b(?:src|href)\s*=\s*["']?(https?:)?//(?!127\.0\.0\.1|localhost)""", re.IGNORECASE)


def get(server: ViewerServer, path: str, headers: dict[str, str] | None = None, method: str = "GET",
        body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
    """One raw request (the path sent as given: no client-side normalisation of `..`, no proxy)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        res = conn.getresponse()
        return res.status, {k.lower(): v for k, v in res.getheaders()}, res.read()
    finally:
        conn.close()


@pytest.fixture
def frontend(tmp_path: Path) -> Path:
    """A stand-in for circuit-tracer's frontend/assets: a page loading every CDN script the real one loads."""
    root = tmp_path / "frontend"
    (root / "feature_examples").mkdir(parents=True)
    scripts = "\n".join(f"<script src='{url}'></script>" for url in CDN_SCRIPTS)
    (root / "index.html").write_text(
        f"<!DOCTYPE html>\n<link rel='stylesheet' href='./style.css'>\n{scripts}\n"
        "<script src='./util.js'></script>\n<script>window.isLocalServing = true</script>\n"
    )
    (root / "style.css").write_text("body { margin: 0 }\n")
    (root / "util.js").write_text("window.util = {}\n")
    (root / "feature_examples" / "list.js").write_text("// a nested asset\n")
    return root


@pytest.fixture
def graphs(tmp_path: Path) -> Path:
    return write_graph_dir(tmp_path / "graphs")


@pytest.fixture
def features(tmp_path: Path) -> Path:
    return write_feature_dir(tmp_path / "features-out")


def config(frontend: Path, features: Path | None = None, **kwargs: object) -> ServeConfig:
    return ServeConfig(port=0, frontend=str(frontend), features=str(features) if features else None, **kwargs)


def test_binds_loopback_and_serves_the_page_offline(graphs: Path, frontend: Path, features: Path) -> None:
    with running(graphs, config(frontend, features)) as server:
        assert server.httpd.server_address[0] == "127.0.0.1"
        assert server.url == f"http://127.0.0.1:{server.port}/"
        status, headers, body = get(server, "/")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "connect-src 'self'" in headers["content-security-policy"]
        page = body.decode()
        assert not EXTERNAL.findall(page), page
        local = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page)
        assert "/_clt/vendor/d3.min.js" in local and "/_clt/vendor/dagre.min.js" in local
        assert local.index("/_clt/jetpack-pre.js") < local.index("/_clt/vendor/d3-jetpack.js")
        for path in local:  # every script and stylesheet the page names is served here
            status, headers, body = get(server, path.lstrip("."))
            assert status == 200 and body, path
            assert headers["content-type"].split(";")[0] in ("text/javascript", "text/css"), path
        assert get(server, "/index.html")[2] == get(server, "/")[2]
        assert get(server, "/feature_examples/list.js")[0] == 200


def test_real_frontend_is_served_offline(graphs: Path, features: Path) -> None:
    """The installed circuit-tracer frontend (where there is one): nothing external left, every asset served."""
    try:
        real = find_frontend()
    except ConfigError as err:
        pytest.skip(str(err))
    page, missing = offline_html((real / "index.html").read_text())
    assert missing == [] and not EXTERNAL.findall(page)
    with running(graphs, config(real, features)) as server:
        page = get(server, "/")[2].decode()
        assert not EXTERNAL.findall(page)
        for path in re.findall(r"""<(?:script|link)\b[^>]*(?:src|href)=['"]([^'"]+)['"]""", page):
            assert get(server, "/" + path.removeprefix("./").lstrip("/"))[0] == 200, path


def test_unknown_external_resources_are_left_out() -> None:
    page, missing = offline_html(
        "<script src='https://cdn.example/x.js'></script><link rel=stylesheet href=\"http://cdn.example/y.css\">"
        "<script src='./local.js'></script>"
    )
    assert missing == ["https://cdn.example/x.js", "http://cdn.example/y.css"]
    assert "cdn.example" not in page and "<script src='./local.js'></script>" in page


def test_graph_metadata_and_graph(graphs: Path, frontend: Path, features: Path) -> None:
    with running(graphs, config(frontend, features)) as server:
        status, headers, body = get(server, "/data/graph-metadata.json")
        assert status == 200 and headers["content-type"] == "application/json"
        assert json.loads(body) == json.loads((graphs / "graph-metadata.json").read_text())
        status, _, body = get(server, f"/graph_data/{SLUG}.json")
        served, written = json.loads(body), graph()
        assert status == 200 and served["nodes"] == written["nodes"] and served["links"] == written["links"]
        assert served["metadata"]["scan"] == FEATURES_SCAN  # the viewer asks this server for the examples
        assert served["metadata"]["clt_original_scan"] == "tiny-clt"
    with running(graphs, config(frontend)) as server:  # no --features: the graph as written
        assert get(server, f"/graph_data/{SLUG}.json")[2] == (graphs / f"{SLUG}.json").read_bytes()


@pytest.mark.parametrize("subdir", ["", "features"])
def test_feature_request_answers_the_written_record(graphs: Path, frontend: Path, features: Path, subdir: str) -> None:
    with running(graphs, config(frontend, features / subdir if subdir else features)) as server:
        for layer in range(LAYERS):
            for index in (0, 5, FEATURES - 1):
                status, headers, body = get(server, f"/clt_features/{cantor(layer, index)}.json")
                assert status == 200 and headers["content-type"] == "application/json"
                record = json.loads(body)
                assert record == read_feature(features / "features", layer, index) == feature_record(layer, index)
        assert get(server, f"/clt_features/{cantor(LAYERS, 0)}.json")[0] == 404  # no such layer
        assert get(server, f"/clt_features/{cantor(0, FEATURES)}.json")[0] == 404  # no such feature
        assert get(server, "/clt_features/x.json")[0] == 404
        assert get(server, "/clt_features/3.bin")[0] == 404


def test_large_graphs_go_compressed(graphs: Path, frontend: Path, features: Path) -> None:
    big = graph("big")
    big["nodes"][0]["clerp"] = "x" * (2 << 20)
    (graphs / "big.json").write_text(json.dumps(big))
    with running(graphs, config(frontend, features)) as server:
        status, headers, body = get(server, "/graph_data/big.json", {"Accept-Encoding": "gzip"})
        assert status == 200 and headers["content-encoding"] == "gzip" and len(body) < 1 << 20
        served = json.loads(gzip.decompress(body))
        assert served["nodes"] == big["nodes"] and served["metadata"]["scan"] == FEATURES_SCAN
        assert "content-encoding" not in get(server, "/graph_data/big.json")[1]
        assert get(server, "/favicon.ico")[0] == 204


def test_feature_request_without_features(graphs: Path, frontend: Path) -> None:
    with running(graphs, config(frontend)) as server:
        status, _, body = get(server, f"/clt_features/{cantor(0, 1)}.json")
        assert status == 404 and "--features" in json.loads(body)["error"]


def test_unpair_inverts_cantor() -> None:
    assert all(unpair(cantor(layer, index)) == (layer, index) for layer in range(40) for index in range(3000))


def test_unknown_paths_are_404(graphs: Path, frontend: Path) -> None:
    with running(graphs, config(frontend)) as server:
        for path in (
            "/nope.js",
            "/data/nope.json",
            "/graph_data/nope.json",
            "/_clt/vendor/nope.js",
            "/feature_examples",
        ):
            status, _, body = get(server, path)
            assert status == 404 and "error" in json.loads(body), path
        assert get(server, "/nope.js", method="HEAD")[0] == 404
        assert get(server, "/nope", method="POST", headers={"Content-Type": "application/json"})[0] == 404


def test_paths_out_of_the_served_directories_are_refused(graphs: Path, frontend: Path, tmp_path: Path) -> None:
    (tmp_path / "secret.json").write_text('{"secret": 1}')
    (graphs / "link.json").symlink_to(tmp_path / "secret.json")
    with running(graphs, config(frontend)) as server:
        for path in ("/graph_data/../secret.json", "/data/%2e%2e/secret.json", "/data/..%2fsecret.json",
                     "/graph_data/..%5csecret.json", "/../secret.json", "/_clt/../serve.py",
                     "/%2e%2e/%2e%2e/secret.json", "/data/link.json"):  # fmt: skip
            status, _, body = get(server, path)
            assert status == 403 and b"secret" not in body, path


def test_foreign_host_header_is_refused(graphs: Path, frontend: Path) -> None:
    """A page of another site that rebinds its name to 127.0.0.1 gets nothing (DNS rebinding)."""
    with running(graphs, config(frontend)) as server:
        assert get(server, "/", headers={"Host": "evil.example:8046"})[0] == 403
        assert get(server, "/", headers={"Host": f"localhost:{server.port}"})[0] == 200


def test_save_writes_the_view_state(graphs: Path, frontend: Path, features: Path) -> None:
    q_params = {"pinnedIds": "0_3_1,1_5_2", "clickedId": "1_5_2"}
    body = json.dumps({"qParams": q_params, "timestamp": "now"}).encode()
    json_type = {"Content-Type": "application/json"}
    with running(graphs, config(frontend, features)) as server:
        assert get(server, f"/save_graph/{SLUG}", json_type, "POST", body)[0] == 200
        saved = json.loads((graphs / f"{SLUG}.json").read_text())
        assert saved["qParams"] == q_params and saved["metadata"]["scan"] == "tiny-clt"  # the file's own scan kept
        assert get(server, f"/save_graph/{SLUG}", {"Content-Type": "text/plain"}, "POST", body)[0] == 415
        other_origin = {**json_type, "Origin": "http://evil.example"}
        assert get(server, f"/save_graph/{SLUG}", other_origin, "POST", body)[0] == 403
        assert get(server, "/save_graph/..%2fsecret", json_type, "POST", body)[0] == 403
        assert get(server, "/save_graph/nope", json_type, "POST", body)[0] == 404
        assert get(server, f"/save_graph/{SLUG}", json_type, "POST", b"[]")[0] == 400
    with running(graphs, config(frontend, save=False)) as server:
        assert get(server, f"/save_graph/{SLUG}", json_type, "POST", body)[0] == 403


def test_bad_directories_are_one_clear_error(tmp_path: Path, frontend: Path, graphs: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        ViewerServer(tmp_path / "missing", config(frontend))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"holds no graph files \(no graph-metadata.json\); write graphs"):
        ViewerServer(tmp_path / "empty", config(frontend))
    (tmp_path / "empty" / "graph-metadata.json").write_text('{"graphs": []}')
    with pytest.raises(ConfigError, match="lists no graphs"):
        ViewerServer(tmp_path / "empty", config(frontend))
    (tmp_path / "empty" / "graph-metadata.json").write_text("not json")
    with pytest.raises(ConfigError, match="not a graph list"):
        ViewerServer(tmp_path / "empty", config(frontend))
    with pytest.raises(ConfigError, match="holds no feature files"):
        ViewerServer(graphs, config(frontend, tmp_path / "empty"))


def test_missing_frontend_and_busy_port(
    graphs: Path, frontend: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FRONTEND_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match=f"\\${FRONTEND_ENV} .* has no index.html"):
        ViewerServer(graphs, ServeConfig(port=0))
    monkeypatch.setenv(FRONTEND_ENV, str(frontend))
    with ViewerServer(graphs, ServeConfig(port=0)) as first:  # the variable is where the frontend is looked for
        assert first.frontend == frontend
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{first.port}"):
            ViewerServer(graphs, ServeConfig(port=first.port))


def test_serve_prints_the_url_and_stops_on_ctrl_c(graphs: Path, frontend: Path) -> None:
    code = (
        "import sys; from clt_core.viewer import ServeConfig, serve; "
        "serve(sys.argv[1], ServeConfig(port=0, frontend=sys.argv[2]))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(graphs), str(frontend)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])  # fmt: skip
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert "1 graph with no feature examples" in first, first
        url = re.search(r"http://127\.0\.0\.1:(\d+)/", first)
        assert url and "Ctrl-C" in proc.stdout.readline()
        conn = http.client.HTTPConnection("127.0.0.1", int(url.group(1)), timeout=10)
        conn.request("GET", "/")
        assert conn.getresponse().status == 200
        conn.close()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 0 and err.strip() == "stopped", err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with socket.socket() as s:  # the port was released
        s.bind(("127.0.0.1", int(url.group(1))))


def test_cli_reports_a_directory_without_graphs_in_one_line(tmp_path: Path, frontend: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from clt_core.cli import build_parser, main

    parser = build_parser(plugins=False)
    if "serve" not in next(a for a in parser._actions if hasattr(a, "choices") and a.choices).choices:
        pytest.skip("`clt serve` is not registered in clt_core/cli.py yet")
    (tmp_path / "empty").mkdir()
    assert main(["serve", str(tmp_path / "empty"), "--frontend", str(frontend)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no graph files" in err


def test_vendored_files_are_the_ones_their_readme_names() -> None:
    """Each vendored library is the file whose sha256 `assets/vendor/README.md` records, with its license beside it."""
    vendor = Path(__file__).parents[2] / "clt_core" / "viewer" / "assets" / "vendor"
    rows = re.findall(r"^\| `([^`]+)` \|[^|]+\|[^|]+\| ([\d,]+) \| `([0-9a-f]{64})` \| [^|]*?`(LICENSE[^`]+)`", (
        vendor / "README.md").read_text(), re.MULTILINE)  # fmt: skip
    assert sorted(r[0] for r in rows) == sorted(p.name for p in vendor.glob("*.js"))
    for name, size, digest, license_file in rows:
        data = (vendor / name).read_bytes()
        assert len(data) == int(size.replace(",", "")) and hashlib.sha256(data).hexdigest() == digest, name
        assert (vendor / license_file).is_file()
    assert all((vendor.parent / p).is_file() for paths in CDN_SCRIPTS.values() for p in paths)
