# Two commands do all the set-up on a fresh machine (Python 3.11, CPU, nothing installed):
#   make demo   create .venv and run the offline quickstart (scenes -> embedder -> retrieval -> caption -> eval)
#   make test   create .venv and run the whole test suite
# torch and torchvision go on ONE pip line with exact versions: that takes the CPU build of torch
# on this machine's disk; a bare `torch`, or torchvision on a later line, pulls a multi-GB CUDA build.
# constraints-cpu.txt pins every other package to versions tested together here: without it pip's
# resolver backtracked through dozens of transformers/peft releases for over 15 minutes.
PYTHON ?= python3
VENV ?= .venv
TORCH_PIN ?= torch==2.13.0 torchvision==0.28.0
BIN := $(VENV)/bin
DEMO ?= demo-run

.PHONY: setup demo test clean

$(BIN)/.installed: pyproject.toml Makefile constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints-cpu.txt $(TORCH_PIN) -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	PATH=$(abspath $(BIN)):$$PATH bash scripts/quickstart.sh $(DEMO)

test: setup
	$(BIN)/python -m pytest -q -rs tests

clean:
	rm -rf $(VENV) $(DEMO)
