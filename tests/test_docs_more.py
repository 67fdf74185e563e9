"""The documentation test (tests/test_docs.py) for every document but the README and jobs/README.md: each block runs as written,
in order, in its document's own environment."""

from __future__ import annotations

import pytest

from tests.test_docs import OTHER_BLOCKS, _shipped_weights_untouched, doc_envs, run_block  # noqa: F401 (fixtures)


@pytest.mark.slow
@pytest.mark.parametrize("block", OTHER_BLOCKS, ids=[b.id for b in OTHER_BLOCKS])
def test_documented_block_runs_as_written(block, doc_envs):  # noqa: F811 (the imported fixture)
    run_block(block, doc_envs)
