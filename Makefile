# Two commands do all the set-up on a fresh machine (Python 3.11, CPU, nothing installed):
#   make demo   create .venv and run the main job with the shipped bundle (new images captioned by every
#               bundled decoder, then `unembed compare` on a small split with its HTML report): minutes
#   make test   create .venv (and install Debian's chromium for the HTML report's browser test) and run the tests
# and more:
#   make quickstart  the offline quickstart from nothing (scenes -> embedder -> retrieval -> caption -> eval)
#   make bundle      trains the shipped model bundle (unembed/bundle) from nothing
# torch and torchvision go on ONE pip line with exact versions: that takes the CPU build of torch
# on this machine's disk; a bare `torch`, or torchvision on a later line, pulls a multi-GB CUDA build.
# constraints-cpu.txt pins every other package to versions tested together here: without it pip's
# resolver backtracked through dozens of transformers/peft releases for over 15 minutes.
# pip compiles the installed packages' bytecode on one core (78 s of a 143 s install); compileall -j 0
# does it on every core (47 s on 2). Compiled ahead it must be: with PYTHONDONTWRITEBYTECODE set
# (as on these machines) nothing is cached at import, and each import of torch and open_clip would
# take 22 s, not 9. (-x: torch's py312_intrinsics.py is Python 3.12 syntax, which pip skips silently.)
PYTHON ?= python3
VENV ?= .venv
TORCH_PIN ?= torch==2.13.0 torchvision==0.28.0
BIN := $(VENV)/bin
DEMO ?= demo-run

.PHONY: setup demo quickstart test browser bundle clean mutation

$(BIN)/.installed: pyproject.toml Makefile constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --no-compile --disable-pip-version-check -c constraints-cpu.txt $(TORCH_PIN) -e '.[dev]'
	$(BIN)/python -m compileall -q -j 0 -x py312_intrinsics $$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') >/dev/null
	touch $@

setup: $(BIN)/.installed

demo: setup
	PATH=$(abspath $(BIN)):$$PATH bash scripts/demo.sh $(DEMO)

quickstart: setup
	PATH=$(abspath $(BIN)):$$PATH bash scripts/quickstart.sh quickstart-run

# The report test drives a real headless chromium; without root (no apt) it is skipped, unless
# UNEMBED_REQUIRE_BROWSER=1 (set by CI) makes a missing browser a failure.
browser:
	@command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
		|| echo "chromium could not be installed: the HTML report's browser tests will be skipped"

# The suite runs on TEST_WORKERS processes (pytest-xdist). worksteal, not load: load hands each worker a fixed
# first chunk, which put every minutes-long test on one worker while the other sat idle for 6 minutes.
TEST_WORKERS ?= 2
test: setup browser
	$(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS) --dist worksteal tests

bundle: setup
	PATH=$(abspath $(BIN)):$$PATH bash scripts/bundle.sh

# Mutation testing of the modules whose logic breaks most silently, on the fast tests that cover
# them (minutes; not part of CI): writes benchmarks/results/mutation.json. mutmut works in mutants/.
MUTATION_WORKERS ?= 2
mutation: setup
	$(BIN)/python -m pip install -q --disable-pip-version-check mutmut==3.8.1
	$(BIN)/python scripts/mutation.py --max-children $(MUTATION_WORKERS)

clean:
	rm -rf $(VENV) $(DEMO) quickstart-run
