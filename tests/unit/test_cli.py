"""The `clt` command line for the data commands: results on stdout, exit status 0 / 1 (verify found problems) /
2 (user error, one line on stderr, never a traceback)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from clt_core.cli import build_parser, main
from clt_core.data.store import ActivationStore

SMALL = ["--rows", "300", "--num-layers", "2", "--d-model", "8", "--num-features", "16", "--rows-per-chunk", "64"]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, command: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"clt {command}: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def synthetic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    url = str(tmp_path / "syn")
    code, out, _ = run(capsys, "make-synthetic", url, *SMALL, "--quiet")
    assert code == 0 and "rows=300" in out
    return url


def test_make_synthetic_writes_the_requested_store(synthetic: str) -> None:
    store = ActivationStore.open(synthetic)
    assert (store.num_rows, store.num_layers, store.d_model, store.rows_per_chunk) == (300, 2, 8, 64)
    assert store.info.model["name"] == "synthetic"


def test_make_synthetic_takes_a_yaml_config_that_flags_override(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "syn.yaml"
    config.write_text("rows: 50\nnum_layers: 3\nd_model: 4\nnum_features: 8\ndtype: float32\n")
    url = str(tmp_path / "s")
    code, _, _ = run(capsys, "make-synthetic", url, "--config", str(config), "--rows", "20", "-q")
    store = ActivationStore.open(url)
    assert code == 0 and (store.num_rows, store.num_layers, store.dtype) == (20, 3, "float32")


def test_info_prints_the_geometry_as_json(synthetic: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "info", synthetic)
    info = json.loads(out)
    assert code == 0
    assert (info["rows"], info["chunks"], info["rows_per_chunk"], info["num_layers"], info["d_model"]) == (
        300,
        5,
        64,
        2,
        8,
    )
    assert info["bytes_per_row"] == 2 * 2 * 8 * 2 + 4 and info["norm_stats_rows"] is None


def test_norm_stats_are_computed_into_the_store(synthetic: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "norm-stats", synthetic, "--workers", "3", "-q")
    assert code == 0 and out.strip() == f"norm stats over 300 rows written to {synthetic}"
    assert err == ""  # --quiet: no progress bar
    assert json.loads(run(capsys, "info", synthetic)[1])["norm_stats_rows"] == 300


def test_verify_passes_a_good_store(synthetic: str, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "norm-stats", synthetic, "-q")
    code, out, _ = run(capsys, "verify", synthetic, "-q")
    assert code == 0
    assert out.startswith(f"{synthetic}: OK: 300 rows in 5 chunks")
    assert "problem" not in out and "warning" not in out


def test_verify_fails_a_store_with_a_corrupt_chunk(synthetic: str, capsys: pytest.CaptureFixture[str]) -> None:
    chunk = Path(synthetic) / "inputs" / "c" / "3" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    code, out, err = run(capsys, "verify", synthetic, "-q")
    assert code == 1
    assert "FAILED" in out and "chunk 3 (rows 192..255) cannot be decoded: 'inputs'" in out
    assert "Traceback" not in out + err
    # metadata-only verification does not read chunks, so it cannot see this
    assert run(capsys, "verify", synthetic, "--no-scan", "-q")[0] == 0


def test_verify_shows_progress_unless_quiet(synthetic: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, _, err = run(capsys, "verify", synthetic)
    assert "verify" in err and "300" in err


def test_verify_fails_a_missing_store_with_status_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "verify", str(tmp_path / "nothing"), "-q")
    assert code == 1 and "could not be opened" in out and "no activation store here" in out
    assert err == ""


def test_info_on_a_missing_store_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "info", str(tmp_path / "nothing"))
    assert out == ""
    assert_one_line_error(code, err, "info", "no activation store here", str(tmp_path / "nothing"))


def test_an_unsupported_url_is_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "norm-stats", "gs://bucket/x", "-q")
    assert_one_line_error(code, err, "norm-stats", "unsupported URL scheme")


def test_overwriting_needs_the_flag(synthetic: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "make-synthetic", synthetic, *SMALL, "-q")
    assert_one_line_error(code, err, "make-synthetic", "already exists; pass --overwrite")
    code, _, _ = run(capsys, "make-synthetic", synthetic, *SMALL[:1], "10", *SMALL[2:], "--overwrite", "-q")
    assert code == 0 and ActivationStore.open(synthetic).num_rows == 10


def test_a_bad_config_file_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("rows: 10\nlayers: 3\n")
    code, _, err = run(capsys, "make-synthetic", str(tmp_path / "s"), "--config", str(config))
    assert_one_line_error(code, err, "make-synthetic", "unknown key 'layers'", str(config))
    assert not (tmp_path / "s").exists()


def test_a_bad_flag_value_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "make-synthetic", str(tmp_path / "s"), "--rows", "0")
    assert_one_line_error(code, err, "make-synthetic", "command line: rows: Input should be greater than or equal to 1")


def test_norm_stats_of_an_empty_store_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = str(tmp_path / "e")
    ActivationStore.create(url, num_layers=2, d_model=4)
    code, _, err = run(capsys, "norm-stats", url, "-q")
    assert_one_line_error(code, err, "norm-stats", "no committed rows")


def test_argparse_errors_exit_with_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["make-synthetic", "/tmp/x", "--dtype", "int8"])
    assert info.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def _subcommands() -> list[str]:
    """Every subcommand of `clt`, read off the parser so a new one is covered without editing the test."""
    parser = build_parser()
    return sorted(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices)


@pytest.mark.parametrize("command", ["", *_subcommands()])
def test_help_works_for_clt_and_every_subcommand(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"] if command else ["--help"])
    out = capsys.readouterr().out
    assert info.value.code == 0
    assert out.startswith(f"usage: clt {command}".rstrip())


def test_train_refuses_bad_runs_in_one_line(synthetic: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "run")
    cases = [
        (["--out", out], "pass --data URL"),
        (["--data", str(tmp_path / "nope"), "--out", out], "no activation store here"),
        (["--data", synthetic, "--out", out, "--num-features", "127", "--nproc", "2"], "multiple of --nproc 2"),
        (["--data", synthetic, "--out", out, "--activation-fn", "topk", "--num-features", "8", "--k", "9"], "k=9"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--data", synthetic, "--out", out, "--device", "cuda"], "CUDA is not available"))
    for argv, message in cases:
        code, _, err = run(capsys, "train", "-q", *argv)
        assert code == 2 and message in err and err.count("\n") == 1, err


# ------------------------------------------------------------------------------------------------------- plugins
def test_models_is_a_plugin_that_clt_help_lists(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="clt_pipeline.commands") if e.name == "models"]
    assert entry.value == "flows.cli:register"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Registered models in MLflow" in capsys.readouterr().out
    code, _, err = run(capsys, "models", "list")
    assert_one_line_error(code, err, "models", "no MLflow tracking URI")


def test_the_core_cli_works_without_the_flows_package(synthetic: str) -> None:
    """`flows` unimportable (as if not installed): `clt` still runs every core command, and has no `models`."""
    import subprocess
    import sys

    def clt(*argv: str) -> subprocess.CompletedProcess[str]:
        code = "import sys; sys.modules['flows'] = None; from clt_core.cli import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)

    help_text = clt("--help")
    assert help_text.returncode == 0 and "make-synthetic" in help_text.stdout and "models" not in help_text.stdout
    info = clt("info", synthetic)
    assert info.returncode == 0 and json.loads(info.stdout)["rows"] == 300, info.stderr
    missing = clt("models", "list")
    assert missing.returncode == 2 and "invalid choice: 'models'" in missing.stderr


def test_clt_core_never_imports_flows() -> None:
    import ast

    root = Path(__file__).parents[2] / "clt_core"
    offenders = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            offenders += [f"{path.relative_to(root)}: {n}" for n in names if n == "flows" or n.startswith("flows.")]
    assert not offenders
