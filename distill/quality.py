"""Sample quality on the shapes world: how good a latent sampler (teacher or student) is, measured
with the packaged shapes evaluator, the miniature of the papers' FID / CLIP-score tables.

A sampler is any function (prompts, noise [B, C, h, w]) -> latents [B, C, h, w] in the teacher's
latent space. `ShapesQuality.score(sampler)` reports, on fixed prompts and held-out noises:
- accuracy: fraction of images with every attribute right (and per attribute): the CLIP-score analogue;
- frechet: Fréchet distance of evaluator features against real renderings: the FID analogue;
- diversity: mean pairwise feature distance among K samples of the same prompt;
- distance: MSE in latent space to the teacher's multi-step target from the same noise (what
  Diffusion2GAN regresses to), on the same noises.
The fixed sets are pure functions of the seeds below, so figures from different runs compare.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from d2g.shapes import sampling, world
from d2g.shapes.evaluator import Evaluator, diversity, frechet_distance
from d2g.teacher.noise import batch_noise
from d2g.teacher.solver import SolverSettings, TeacherSolver
from d2g.teacher.vae import decode, latent_shape, to_unit_range
from store import LATENT

Sampler = Callable[[list[str], torch.Tensor], torch.Tensor]

# Seeds distinct from everything pairgen/training use by default (pairs: dataset seed 0).
PROMPT_SEED, NOISE_SEED, REAL_SEED, DIVERSITY_SEED = 5_001, 5_002, 5_003, 5_004


def teacher_sampler(pipe, steps: int, guidance: float) -> Sampler:
    """The teacher's own deterministic solver at `steps` steps: DDIM (trailing grid, eta 0) for a
    UNet teacher, flow Euler for a flow-matching one (pairgen's `auto`)."""
    solver = TeacherSolver(pipe, SolverSettings(scheduler="auto", steps=steps, guidance=guidance,
                                                timestep_spacing="trailing"))
    return lambda prompts, noise: solver.solve(prompts, noise)[LATENT].float()


def student_sampler(pipe, steps: int | None = None) -> Sampler:
    """An exported student (distill export) in `steps` steps (default: the steps it was trained
    for); its between-step noise is keyed by each sample's starting noise (deterministic)."""
    from distill.export import student_latents

    return lambda prompts, noise: student_latents(pipe, prompts, noise, steps)


class ShapesQuality:
    """Fixed evaluation sets for the shapes teacher, and the scores of a sampler on them.

    Args:
        teacher_pipe: the shapes teacher pipeline (its VAE decodes every sampler's latents).
        num: prompts and held-out noises scored.
        diversity_prompts, diversity_samples: the diversity set: this many prompts, each with
            this many noises.
        target_steps, target_guidance: the teacher's multi-step sampler whose latents are the
            distance targets.
        batch_size: samples per sampler call and per decode.
        evaluator: the shapes evaluator (default: the packaged one).
        split: whose captions and real renderings: "train", or "heldout", the attribute
            combinations no pair store made from `shapes://train` contains (zero-shot, as the papers
            evaluate).
    """

    def __init__(self, teacher_pipe, num: int = 256, diversity_prompts: int = 16, diversity_samples: int = 8,
                 target_steps: int = 25, target_guidance: float = 3.0, batch_size: int = 128,
                 evaluator: Evaluator | None = None, split: str = "train"):
        if split not in world.SPLITS:
            raise ValueError(f"ShapesQuality: unknown split {split!r}; choose one of {world.SPLITS}")
        self.teacher = teacher_pipe
        self.split = split
        self.judge = evaluator or Evaluator.load()
        self.batch_size = batch_size
        self.latent_shape = latent_shape(teacher_pipe)
        self.prompts, self.attributes = sampling.prompts(PROMPT_SEED, num, split)
        self.noise = batch_noise(NOISE_SEED, list(range(num)), self.latent_shape)
        real_images, _, _ = world.batch(REAL_SEED, 0, num, split)
        self.real_features = self.judge.features(real_images)
        div_prompts, _ = sampling.prompts(DIVERSITY_SEED, diversity_prompts, split)
        self.diversity_shape = (diversity_prompts, diversity_samples)
        self.diversity_prompts = [p for p in div_prompts for _ in range(diversity_samples)]
        self.diversity_noise = batch_noise(DIVERSITY_SEED, list(range(len(self.diversity_prompts))), self.latent_shape)
        # The teacher's multi-step sampler; score it through this object and its latents are the
        # targets themselves, not sampled a second time.
        self.target_sampler = teacher_sampler(teacher_pipe, target_steps, target_guidance)
        self._targets: torch.Tensor | None = None

    @property
    def targets(self) -> torch.Tensor:
        """The teacher's multi-step latents for the fixed noises: what a distilled student aims at."""
        if self._targets is None:
            self._targets = self.latents(self.target_sampler)
        return self._targets

    @torch.no_grad()
    def latents(self, sampler: Sampler, prompts: list[str] | None = None,
                noise: torch.Tensor | None = None) -> torch.Tensor:
        """A sampler's latents for `prompts` and `noise` (default: the fixed set), in batches."""
        prompts = self.prompts if prompts is None else prompts
        noise = self.noise if noise is None else noise
        chunks = [sampler(prompts[i:i + self.batch_size], noise[i:i + self.batch_size])
                  for i in range(0, len(prompts), self.batch_size)]
        return torch.cat(chunks).float()

    @torch.no_grad()
    def images(self, latents: torch.Tensor) -> torch.Tensor:
        """Decoded with the teacher's VAE (a student shares it), [N, 3, H, W] in [0, 1], quantised to
        8 bits as a saved image would be."""
        images = torch.cat([to_unit_range(decode(self.teacher.vae, chunk)) for chunk in latents.split(self.batch_size)])
        return (images * 255).round() / 255

    @torch.no_grad()
    def score(self, sampler: Sampler) -> dict:
        """accuracy (and per attribute), frechet, diversity and distance of a sampler (see the
        module docstring), and the number of prompts scored."""
        latents = self.targets if sampler is self.target_sampler else self.latents(sampler)
        images = self.images(latents)
        accuracy = self.judge.attribute_accuracy(images * 2 - 1, self.attributes)
        div_images = self.images(self.latents(sampler, self.diversity_prompts, self.diversity_noise))
        p, k = self.diversity_shape
        return {
            "accuracy": accuracy["all"],
            "accuracy_by_attribute": {a: v for a, v in accuracy.items() if a != "all"},
            "frechet": frechet_distance(self.judge.features(images * 2 - 1), self.real_features),
            "diversity": diversity(self.judge.features(div_images * 2 - 1).view(p, k, -1)),
            "distance": float(((latents - self.targets) ** 2).mean()),
            "num": len(self.prompts),
        }

    def real_floor(self) -> dict:
        """The same measures for real renderings: Fréchet between two real sets, real diversity."""
        import numpy as np

        other, _, _ = world.batch(REAL_SEED + 1, 0, len(self.prompts), self.split)
        p, k = self.diversity_shape
        rng = np.random.default_rng(DIVERSITY_SEED)
        _, div_attrs = sampling.prompts(DIVERSITY_SEED, p, self.split)
        real = np.stack([world.render(a, rng) for a in div_attrs for _ in range(k)])
        return {"frechet": frechet_distance(self.judge.features(other), self.real_features),
                "diversity": diversity(self.judge.features(real).view(p, k, -1))}
