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

# Two pytest workers (TEST_WORKERS=0 runs serially), each test file on one worker, so module
# fixtures (tiny teachers, pair stores, a document's commands in order) are built once; each worker
# that needs Ray starts its own session Ray. (loadgroup's xdist_group marks do not reach the
# scheduler under pytest 9: xdist 3.8 renames items through an attribute pytest no longer reads.)
TEST_WORKERS ?= 2
test: env
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: env
	$(VENV)/bin/ruff check store pairgen distill d2g tests bench

clean-demo:
	rm -rf demo-out
