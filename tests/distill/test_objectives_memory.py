"""Memory options: gradient checkpointing of G and D (including R1's double backward) under bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from distill.objective_config import ADDConfig, parse_objective_config
from distill.objectives import make_objective
from tests.helpers.objectives import PROMPTS


@pytest.mark.parametrize("name", ["d2g", "add"])
def test_checkpointing_and_bf16_autocast(name, sdxl_teacher):
    from d2g.teacher.loading import load_teacher

    pipe = load_teacher(str(sdxl_teacher))
    config = parse_objective_config(name, {"regression_loss": "mse", "gradient_checkpointing": True})
    obj = make_objective(name, pipe, config)
    assert obj.generator.unet.is_gradient_checkpointing
    if name == "d2g":
        assert obj.discriminator.unet.is_gradient_checkpointing
    batch = {"noise": torch.randn(4, 4, 8, 8), "latent": torch.randn(4, 4, 8, 8), "prompt": PROMPTS}
    for step in (0, 1):  # step 0 runs R1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            d_loss, d_logs = obj.discriminator_loss(batch, step)
        d_loss.backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            g_loss, _ = obj.generator_loss(batch, step)
        g_loss.backward()
        assert d_loss.dtype == g_loss.dtype == torch.float32
    assert "d/r1" in obj.discriminator_loss(batch, 0)[1]
    assert all(p.grad is not None for p in obj.generator.parameters())
    assert all(p.grad is not None for p in obj.discriminator.parameters())


def test_half_precision_frozen_teacher_with_fp32_trainables(sd15_teacher):
    from d2g.teacher.loading import load_teacher

    pipe = load_teacher(str(sd15_teacher))
    obj = make_objective("add", pipe, ADDConfig(frozen_dtype="bf16", sd_guidance_scale=2.0))
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in obj.generator.parameters())
    assert all(p.dtype == torch.float32 for p in obj.discriminator.parameters())
    batch = {"noise": torch.randn(4, 4, 8, 8), "latent": torch.randn(4, 4, 8, 8), "prompt": PROMPTS}
    d_loss, _ = obj.discriminator_loss(batch, 0)
    d_loss.backward()
    g_loss, logs = obj.generator_loss(batch, 1)
    g_loss.backward()
    assert torch.isfinite(g_loss) and all(p.grad is not None for p in obj.generator.parameters())
    assert all(p.grad is None for p in pipe.unet.parameters())
