# The README's two commands: `make demo` and `make test`. Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: env demo test lint clean-demo

env:
	@bash scripts/setup_env.sh

demo: env
	$(PY) -m d2g.demo $(DEMO_ARGS)

test: env
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: env
	$(VENV)/bin/ruff check store pairgen distill d2g tests bench

clean-demo:
	rm -rf demo-out
