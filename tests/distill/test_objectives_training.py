"""A short run of each objective on a fixed pair set lowers the student's distance to the teacher's
ODE output on held-out noises (SD1.5 and SDXL architectures).

Pairs: the tiny teacher's own 4-step trailing DDIM from fixed noises (16 to train on, 8 held out).
At initialisation the student is the teacher's one-step prediction, so the distance it must close
is the 1-step vs 4-step gap. Runs are kept short (tens of steps, not hundreds) for the suite's
time budget; bench-style longer runs belong to the trainer.

ADD alone (adversarial + score distillation) is not expected to lower this distance with a
random-weight teacher: its score-distillation target is the teacher's denoising, which for an
untrained network is unrelated to the teacher's own ODE outputs. It is tested here in the
combination the config allows (add + regression weight); ADD alone is tested on the trained shapes
teacher in test_objectives_shapes.py, and its discriminator's learning in test_discriminator_add.py.
"""

from __future__ import annotations

import pytest
import torch

from distill.objective_config import parse_objective_config
from distill.objectives import make_objective
from tests.helpers.objectives import make_pairs, mse_to_target, train

E_LPIPS = {"regression_kwargs": {"allow_random": True, "width": 0.125}}
CASES = [
    ("sd15_teacher", "regression", 30, {}),
    ("sd15_teacher", "d2g", 20, E_LPIPS),
    ("sd15_teacher", "add", 20, {"regression_weight": 1.0, "lambda_sd": 0.1, "lambda_gan": 0.1}),
    ("sdxl_teacher", "regression", 30, {}),
    ("sdxl_teacher", "d2g", 20, E_LPIPS),
    ("sdxl_teacher", "add", 20, {"regression_weight": 1.0, "lambda_sd": 0.1, "lambda_gan": 0.1}),
]
_PAIRS: dict = {}


def _setup(teacher_path):
    from d2g.teacher.loading import load_teacher

    pipe = load_teacher(str(teacher_path))
    key = str(teacher_path)
    if key not in _PAIRS:
        _PAIRS[key] = (make_pairs(pipe, 16, seed=0), make_pairs(pipe, 8, seed=1))
    return pipe, *_PAIRS[key]


@pytest.mark.slow
@pytest.mark.parametrize("teacher,name,steps,overrides", CASES, ids=[f"{t.split('_')[0]}-{n}" for t, n, _, _ in CASES])
def test_short_training_lowers_heldout_distance(teacher, name, steps, overrides, request):
    pipe, train_pairs, heldout = _setup(request.getfixturevalue(teacher))
    torch.manual_seed(0)
    obj = make_objective(name, pipe, parse_objective_config(name, overrides))
    before = mse_to_target(obj, heldout)
    history = train(obj, train_pairs, steps, lr_g=1e-4, lr_d=1e-4)
    after = mse_to_target(obj, heldout)
    print(f"{teacher} {name}: held-out MSE {before:.4f} -> {after:.4f} in {steps} steps; last logs {history[-1]}")
    assert all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    assert after < 0.8 * before
