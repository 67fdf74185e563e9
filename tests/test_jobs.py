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


@pytest.mark.parametrize("path", sorted(JOBS.glob("distill_*.yaml")), ids=lambda p: p.name)
def test_distill_job_configs_validate(path):
    from distill.train_config import load_train_config

    config = load_train_config(str(path))
    assert config.data.startswith("s3://") and config.out.startswith("s3://")
    assert config.workers > 1 and config.amp == "bf16" and config.use_gpu
