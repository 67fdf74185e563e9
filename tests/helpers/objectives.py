"""Shared helpers for the objective/generator/discriminator tests: teacher pairs and a tiny training loop."""

from __future__ import annotations

import torch

PROMPTS = ["a red circle", "a blue square", "a green cat", "a red square"]


def ddim_trailing(pipe, steps: int):
    """DDIM on the trailing grid with the teacher's betas, kwargs pinned (from_config would carry
    an Euler scheduler's unknown kwargs across). set_alpha_to_one=True: the last step returns x0."""
    from diffusers import DDIMScheduler

    cfg = pipe.scheduler.config
    return DDIMScheduler(
        num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start, beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule, clip_sample=False, set_alpha_to_one=True, steps_offset=0,
        prediction_type=cfg.prediction_type, timestep_spacing="trailing",
    )


@torch.no_grad()
def teacher_latents(pipe, noise: torch.Tensor, prompts: list[str], steps: int) -> torch.Tensor:
    """The teacher's own DDIM ODE output (latent space) from the given noise."""
    original = pipe.scheduler
    pipe.scheduler = ddim_trailing(pipe, steps)
    try:
        size = noise.shape[-1] * pipe.vae_scale_factor
        out = pipe(prompt=prompts, latents=noise.clone(), num_inference_steps=steps, guidance_scale=1.0,
                   output_type="latent", height=size, width=size)
        return out.images
    finally:
        pipe.scheduler = original


def make_pairs(pipe, n: int, seed: int, steps: int = 4) -> dict:
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 4, 8, 8, generator=gen)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    return {"noise": noise, "latent": teacher_latents(pipe, noise, prompts, steps), "prompt": prompts}


def mse_to_target(obj, pairs: dict) -> float:
    with torch.no_grad():
        out = obj.sample({"noise": pairs["noise"], "prompt": pairs["prompt"]}, steps=1)
    return float(((out - pairs["latent"]) ** 2).mean())


def minibatch(pairs: dict, size: int | None, generator: torch.Generator) -> dict:
    """A random minibatch of `size` pairs (all pairs when size is None)."""
    n = len(pairs["prompt"])
    if size is None or size >= n:
        return pairs
    idx = torch.randperm(n, generator=generator)[:size]
    return {k: ([v[i] for i in idx] if isinstance(v, list) else v[idx]) for k, v in pairs.items()}


def train(obj, pairs: dict, steps: int, lr_g: float = 1e-3, lr_d: float = 1e-3, callback=None,
          batch_size: int | None = None, seed: int = 0) -> list[dict]:
    """Alternating G/D steps with AdamW, the way the trainer drives an objective; every step sees
    all pairs, or a random minibatch of `batch_size`. `callback(steps_done)` runs after every step."""
    opt_g = torch.optim.AdamW(obj.generator.parameters(), lr=lr_g, weight_decay=0.0)
    opt_d = torch.optim.AdamW(obj.discriminator.parameters(), lr=lr_d, weight_decay=0.0) if obj.discriminator else None
    history = []
    order = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = minibatch(pairs, batch_size, order)
        logs = {}
        if opt_d is not None:
            opt_d.zero_grad(set_to_none=True)
            d_loss, d_logs = obj.discriminator_loss(batch, step)
            d_loss.backward()
            opt_d.step()
            logs.update(d_logs)
        opt_g.zero_grad(set_to_none=True)
        g_loss, g_logs = obj.generator_loss(batch, step)
        g_loss.backward()
        opt_g.step()
        logs.update(g_logs)
        history.append(logs)
        if callback is not None:
            callback(step + 1)
    return history
