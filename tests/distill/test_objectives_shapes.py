"""A few hundred steps of each objective on the trained shapes teachers (SD1.5 and SDXL layouts)
improve the one-step student by what that objective aims at, as measured by the shapes evaluator.

The tiny random teachers of test_objectives_training.py check that regression and d2g close the
gap to the teacher's ODE output; they cannot test ADD, whose score-distillation target (the
teacher's denoising of the re-noised student output) only means something for a trained teacher.
Here the teacher is real:
- the student starts as the teacher's unguided one-step prediction: a blurred average image;
- `d2g` regresses onto the guided ODE pairs: the held-out latent distance falls;
- `add` does not regress onto pairs at all (its student may land on a different sharp image than
  the ODE's for the same noise), so the evaluator judges it; its distance must only not grow;
- every objective must raise every-attribute accuracy above the starting point's;
- on the SDXL-layout teacher (pooled embeddings and time ids reach generator, discriminator heads
  and the score-distillation teacher) ADD alone runs the same check: the tiny random SDXL teachers
  elsewhere cover regression and d2g, but only a trained teacher gives ADD a meaningful target.
The Fréchet distance is not asserted: with 128 samples of 128-d features it is dominated by
sample-size bias; bench/results.py measures it on larger sets.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from d2g.shapes import sampling
from d2g.teacher.noise import batch_noise
from distill.objective_config import parse_objective_config
from distill.objectives import make_objective
from distill.quality import ShapesQuality, teacher_sampler
from tests.helpers.objectives import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not all((Path(p) / "model_index.json").exists()
                               for p in (sampling.TEACHER_PATH, sampling.TEACHER_XL_PATH)),
                       reason="shapes teacher weights not committed"),
]
# Fewer solver steps than the 25 of real pairs, for the suite's budget: at 4 steps the teacher still
# gets 98.4% of images every-attribute right (docs/RESULTS.md).
PAIR_STEPS, GUIDANCE = 4, 3.0
E_LPIPS = {"regression_kwargs": {"weights": "shapes"}}
# Regression alone is left to the tiny-teacher tests and bench/results.py (it reached 94% here in
# 200 steps, like d2g), to keep the suite inside its time budget.
# ADD runs as a one-step student with the unguided score-distillation target: the setting these
# figures were measured in (the `add` preset is now a 4-step student, and its target defaults to the
# pairs' guidance, read from a store this test does not have). ADD on the SD1.5 layout is left to the
# tiny-teacher tests, also for the budget: the SDXL layout exercises more of it (pooled embeddings,
# time ids).
ADD_ONE_STEP = {"student_steps": 1, "sd_guidance_scale": 1.0}
CASES = {  # name: (teacher alias, objective, config overrides, learning rates, steps)
    "d2g": ("shapes", "d2g", E_LPIPS, dict(lr_g=1e-4, lr_d=1e-4), 80),
    "add-sdxl": ("shapes-xl", "add", ADD_ONE_STEP, dict(lr_g=2e-4, lr_d=2e-4), 200),
}
BATCH = 16


_SETUPS: dict = {}


@pytest.fixture(autouse=True)
def _both_cores():
    """These tests are the suite's longest: in a serial run nothing else computes while they run, so
    they use two torch threads (1.3x faster here), then give back the suite's one thread. Under
    pytest-xdist another worker shares the cores, and two threads there ran 6x slower, not faster."""
    before = torch.get_num_threads()
    if "PYTEST_XDIST_WORKER" not in os.environ:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    torch.set_num_threads(before)


def world_setup(alias: str):
    """Teacher, quality sets and 512 ODE pairs for `alias`, built once per module run."""
    if alias not in _SETUPS:
        _SETUPS[alias] = _build_setup(alias)
    return _SETUPS[alias]


def _build_setup(alias: str):
    from d2g.teacher.loading import load_teacher

    teacher = load_teacher(alias)
    quality = ShapesQuality(teacher, num=128, diversity_prompts=8, diversity_samples=4, target_steps=PAIR_STEPS,
                            target_guidance=GUIDANCE)
    prompts, _ = sampling.prompts(1, 512, "train")
    noise = batch_noise(0, list(range(len(prompts))), quality.latent_shape)
    latent = quality.latents(teacher_sampler(teacher, PAIR_STEPS, GUIDANCE), prompts, noise)
    return teacher, quality, {"noise": noise, "latent": latent, "prompt": prompts}


def _scores(obj, quality: ShapesQuality) -> dict:
    return quality.score(lambda prompts, noise: obj.sample({"noise": noise, "prompt": prompts}, steps=1))


@pytest.mark.parametrize("name", list(CASES))
def test_objective_improves_the_student_on_the_shapes_teacher(name):
    alias, objective, overrides, lrs, steps = CASES[name]
    teacher, quality, pairs = world_setup(alias)
    torch.manual_seed(0)
    obj = make_objective(objective, teacher, parse_objective_config(objective, overrides))
    before = _scores(obj, quality)
    history = train(obj, pairs, steps, batch_size=BATCH, **lrs)
    after = _scores(obj, quality)
    print(f"{name}: before {before}\n{name}: after  {after}\nlast logs {history[-1]}")
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    # Measured here, from 4-step pairs: 83% -> 92% (d2g, 80 steps, E-LatentLPIPS as published); on the SDXL-layout
    # teacher 86% -> 91% (add, lr 2e-4; at 1e-4 it reached only 89%).
    assert after["accuracy"] >= before["accuracy"] + 0.03
    if objective == "add":
        # Not ADD's target, but a trained teacher's score distillation still moves the student
        # towards the ODE's image (measured 0.86x, 0.87x); on a random teacher it went 1.2 -> 8.1.
        assert after["distance"] < before["distance"]
    else:
        assert after["distance"] < 0.8 * before["distance"]
