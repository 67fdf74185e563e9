"""The trainer contract: objectives keep working when the trainer wraps G and D in DDP."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from distill.objective_config import parse_objective_config
from distill.objectives import make_objective
from tests.helpers.objectives import PROMPTS, train


@pytest.fixture
def gloo_world(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name", ["d2g", "add"])
def test_ddp_wrapped_generator_and_discriminator(name, gloo_world, sd15_teacher):
    from d2g.teacher.loading import load_teacher

    pipe = load_teacher(str(sd15_teacher))
    obj = make_objective(name, pipe, parse_objective_config(name, {"regression_loss": "mse", "r1_every": 2}))
    obj.generator = DDP(obj.generator)
    obj.discriminator = DDP(obj.discriminator)
    batch = {"noise": torch.randn(4, 4, 8, 8), "latent": torch.randn(4, 4, 8, 8), "prompt": PROMPTS}
    history = train(obj, batch, steps=3)  # steps 0 and 2 include the lazy R1 forward
    assert "d/r1" in history[0] and "d/r1" not in history[1]
    assert all(p.grad is not None for p in obj.discriminator.parameters())
    assert all(p.grad is not None for p in obj.generator.parameters())
