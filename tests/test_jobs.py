"""Every Ray job config in jobs/ is a valid config for its tool."""

from __future__ import annotations

from pathlib import Path

import pytest

from pairgen.config import load_config

JOBS = Path(__file__).resolve().parents[1] / "jobs"


@pytest.mark.parametrize("path", sorted(JOBS.glob("pairgen_*.yaml")), ids=lambda p: p.name)
def test_pairgen_job_configs_validate(path):
    config = load_config(str(path))
    assert config.out.startswith("s3://") and config.num_pairs >= 1_000_000
    assert config.dtype == "fp16" and config.workers > 1 and config.scheduler == "ddim"


def test_there_are_job_configs():
    assert len(list(JOBS.glob("*.yaml"))) >= 3
