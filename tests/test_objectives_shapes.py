"""A few hundred steps of each objective on the trained shapes teacher (SD1.5 layout) improve the
one-step student by what that objective aims at, as measured by the shapes evaluator.

The tiny random teachers of test_objectives_training.py check that regression and d2g close the
gap to the teacher's ODE output; they cannot test ADD, whose score-distillation target (the
teacher's denoising of the re-noised student output) only means something for a trained teacher.
Here the teacher is real:
- the student starts as the teacher's unguided one-step prediction: a blurred average image;
- `regression` and `d2g` regress onto the guided ODE pairs: the held-out latent distance falls;
- `add` does not regress onto pairs at all (its student may land on a different sharp image than
  the ODE's for the same noise), so only the evaluator can judge it;
- every objective must raise every-attribute accuracy above the starting point's. (The Fréchet
  distance is not asserted: with 128 samples of 128-d features it is dominated by sample-size bias;
  bench/results.py measures it on larger sets.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from objective_helpers import train

from distill.objectives import ObjectiveConfig, make_objective
from distill.quality import ShapesQuality, teacher_sampler
from pairgen.noise import batch_noise
from pairgen.shapes import sampling

WEIGHTS = Path(sampling.TEACHER_PATH)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (WEIGHTS / "model_index.json").exists(), reason="shapes teacher weights not committed"),
]
PAIR_STEPS, GUIDANCE = 10, 3.0  # fewer solver steps than the 25 of real pairs, for the suite's budget
E_LPIPS = {"regression_kwargs": {"weights": "shapes"}}
CASES = {
    "regression": ("regression", {}, dict(lr_g=1e-4)),
    "d2g": ("d2g", E_LPIPS, dict(lr_g=1e-4, lr_d=1e-4)),
    "add": ("add", {}, dict(lr_g=1e-4, lr_d=1e-4)),
}
STEPS, BATCH = 200, 16


@pytest.fixture(scope="module")
def world_setup():
    from pairgen.teacher import load_teacher

    teacher = load_teacher("shapes")
    quality = ShapesQuality(teacher, num=128, diversity_prompts=8, diversity_samples=4, target_steps=PAIR_STEPS,
                            target_guidance=GUIDANCE)
    prompts, _ = sampling.prompts(1, 512, "train")
    noise = batch_noise(0, list(range(len(prompts))), quality.latent_shape)
    latent = quality.latents(teacher_sampler(teacher, PAIR_STEPS, GUIDANCE), prompts, noise)
    return teacher, quality, {"noise": noise, "latent": latent, "prompt": prompts}


def _scores(obj, quality: ShapesQuality) -> dict:
    return quality.score(lambda prompts, noise: obj.sample({"noise": noise, "prompt": prompts}, steps=1))


@pytest.mark.parametrize("name", list(CASES))
def test_objective_improves_the_student_on_the_shapes_teacher(name, world_setup):
    teacher, quality, pairs = world_setup
    objective, overrides, lrs = CASES[name]
    torch.manual_seed(0)
    obj = make_objective(objective, teacher, ObjectiveConfig(**overrides))
    before = _scores(obj, quality)
    history = train(obj, pairs, STEPS, batch_size=BATCH, **lrs)
    after = _scores(obj, quality)
    print(f"{name}: before {before}\n{name}: after  {after}\nlast logs {history[-1]}")
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    # Measured here: 83% -> 94% (regression), 93% (d2g), 90% (add) in 200 steps.
    assert after["accuracy"] >= before["accuracy"] + 0.03
    if name != "add":
        assert after["distance"] < 0.8 * before["distance"]
