"""The shapes evaluator: Fréchet distance and diversity maths, resumable training, trained accuracy."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from d2g.shapes import evaluator as ev
from d2g.shapes import train, world

needs_weights = pytest.mark.skipif(
    not (ev.DEFAULT_PATH / ev.WEIGHTS_NAME).exists(),
    reason=f"trained evaluator not committed yet at {ev.DEFAULT_PATH} (docs/SHAPES.md)",
)


def test_frechet_distance_is_zero_for_one_set_and_grows_with_a_shift():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 8, generator=g)
    assert abs(ev.frechet_distance(a, a)) < 1e-6
    shifted = ev.frechet_distance(a, a + 3.0)
    assert shifted == pytest.approx(8 * 9.0, rel=1e-6)  # only the squared mean difference changes
    scaled = ev.frechet_distance(a, a * 2.0)
    assert scaled > 1.0


def test_diversity_is_zero_for_copies_and_positive_for_spread():
    copies = torch.ones(3, 4, 5)
    assert ev.diversity(copies) == 0.0
    spread = torch.arange(4.0).view(1, 4, 1).expand(3, 4, 1)
    # pairwise |i-j| over i != j in 0..3: mean 20/12
    assert ev.diversity(spread) == pytest.approx(20 / 12)
    with pytest.raises(ValueError, match="K >= 2"):
        ev.diversity(torch.ones(3, 1, 5))


def test_evaluator_stage_resumes_exactly(tmp_path):
    def run(workdir, *extra):
        train.main(["--stage", "evaluator", "--workdir", str(workdir), "--out", str(workdir / "out"),
                    "--steps", "4", "--checkpoint-every", "1", "--threads", "1", "--check-items", "50", *extra])
        return load_file(workdir / "out" / "evaluator" / ev.WEIGHTS_NAME)

    straight = run(tmp_path / "a")
    train.main(["--stage", "evaluator", "--workdir", str(tmp_path / "b"), "--out", str(tmp_path / "b" / "out"),
                "--steps", "4", "--threads", "1", "--stop-after", "2"])
    assert not (tmp_path / "b" / "out" / "evaluator").exists()  # interrupted: nothing exported
    resumed = run(tmp_path / "b", "--resume")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert torch.load(tmp_path / "b" / "evaluator.ckpt", weights_only=True)["step"] == 4
    loaded = ev.Evaluator.load(tmp_path / "a" / "out" / "evaluator")
    assert loaded.features(world.batch(0, 0, 3)[0]).shape == (3, 128)


def test_missing_evaluator_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ev.Evaluator.load(tmp_path)


@needs_weights
def test_trained_evaluator_is_right_on_real_heldout_images():
    judge = ev.Evaluator.load()
    images, _, attrs = world.batch(98765, 0, 1000, "heldout")
    acc = judge.attribute_accuracy(images, attrs)
    assert acc["all"] >= 0.98, acc
    images, _, attrs = world.batch(98765, 0, 1000, "train")
    assert judge.attribute_accuracy(images, attrs)["all"] >= 0.98
