# Two entry points: `make demo` (set up and run the main job) and `make test` (set up and run the default suite).
# Set-up is idempotent and skipped when pyproject.toml and this Makefile have not changed (a stamp file in .venv).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp-install
DEMO_DIR ?= demo-output
PYTEST_ARGS ?=

export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-all lint format audit bench clean circuit-tracer-venv check-circuit-tracer stack-up stack-down

# The CPU wheel lies in PIP_FIND_LINKS where the machine has one: uv installs it from there in seconds (pip: ~25 s).
ifdef PIP_FIND_LINKS
TORCH_INSTALL = $(BIN)/uv pip install -q --python $(BIN)/python --find-links $(PIP_FIND_LINKS) torch==2.13.0
else
TORCH_INSTALL = $(BIN)/python -m pip install -q torch==2.13.0
endif

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, from the locally cached CPU wheel (see docs/stack.md); then everything else with uv.
	$(BIN)/python -m pip install -q uv
	$(TORCH_INSTALL)
	# Bytecode compiled at install (--compile-bytecode, and compileall for this checkout's packages): this
	# environment sets PYTHONDONTWRITEBYTECODE, so otherwise every `clt` run re-compiles its imports (~0.8 s).
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[dev,demo]'
	$(BIN)/python -m compileall -q clt_core flows
	touch $(STAMP)

install: $(STAMP)

demo: install
	# The whole pipeline (extract -> norm stats -> scramble -> train under torchrun -> convert -> evaluate -> export ->
	# register) as one Prefect flow in ephemeral mode; a re-run reuses every finished stage.
	$(BIN)/python -m flows.pipeline --config configs/demo.yaml

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: install
	$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-all: install
	$(BIN)/pytest -m "" $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

# mypy's configuration (files, plugins, the untyped libraries) is [tool.mypy] in pyproject.toml.
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python bench/store_read.py
	$(BIN)/python bench/scramble.py
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/train_step.py

# circuit-tracer 0.5 pins transformers 4.57, which cannot share our environment: a venv of its own, used by the
# slow test that loads our export with its load_clt (tests/integration/circuit_tracer_check.py runs in it).
# torch first, from the locally cached CPU wheel, and held at that version while circuit-tracer resolves.
CT_VENV := .venv-circuit-tracer
$(CT_VENV)/.stamp:
	test -x $(CT_VENV)/bin/python || $(PYTHON) -m venv $(CT_VENV)
	$(CT_VENV)/bin/python -m pip install -q torch==2.13.0 uv
	$(CT_VENV)/bin/uv pip install -q --python $(CT_VENV)/bin/python 'circuit-tracer==0.5.*' 'nnsight==0.7.0' torch==2.13.0
	touch $@

circuit-tracer-venv: $(CT_VENV)/.stamp

check-circuit-tracer: install circuit-tracer-venv
	$(BIN)/pytest -m slow tests/integration/test_circuit_tracer.py $(PYTEST_ARGS)

# The compose stack's services, natively (no Docker): SeaweedFS, PostgreSQL, MLflow, Prefect server and worker.
stack-up: install
	$(BIN)/python -m infra.stack.native up --dir .stack
	@echo "then: source .stack/env && $(BIN)/prefect --no-prompt deploy --all"

stack-down:
	$(BIN)/python -m infra.stack.native down --dir .stack

# pip-audit, in a venv of its own, over the exact versions installed in $(VENV) (PyPI's advisory data by default;
# AUDIT_ARGS="--vulnerability-service osv" for OSV). Exits non-zero on a known vulnerability.
AUDIT_VENV := .venv-audit
audit: install
	test -x $(AUDIT_VENV)/bin/pip-audit || ($(PYTHON) -m venv $(AUDIT_VENV) && $(AUDIT_VENV)/bin/pip install -q pip-audit==2.10.1)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v ' @ ' > $(AUDIT_VENV)/requirements.txt
	$(AUDIT_VENV)/bin/pip-audit -r $(AUDIT_VENV)/requirements.txt --no-deps --disable-pip --desc on $(AUDIT_ARGS)

clean:
	rm -rf $(VENV) $(CT_VENV) $(AUDIT_VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
