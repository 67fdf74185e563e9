"""The shapes pixel LPIPS (the packaged stand-in for ImageNet VGG16 + LPIPS heads) and how a training
config reaches it: `regression_loss: pixel_lpips` on a shapes teacher needs no weights options."""

from __future__ import annotations

import pytest
import torch

from distill.objective_config import PACKAGED_PIXEL_LPIPS


def _config(teacher: str, **regression_kwargs):
    from distill.train_config import load_train_config

    return load_train_config(None, {
        "data": "/nonexistent/pairs", "teacher": teacher, "out": "/nonexistent/out", "objective": "regression",
        "objective_config": {"regression_loss": "pixel_lpips", "regression_kwargs": regression_kwargs},
    })  # fmt: skip


def test_a_shapes_teacher_gets_the_packaged_pixel_lpips_and_another_teacher_is_told_what_to_give(tmp_path):
    for teacher in ("shapes", "shapes-sd3"):  # a pixel metric does not care which VAE decoded
        assert _config(teacher).objective_config.regression_kwargs == {"weights": "shapes"}
    mine = tmp_path / "mine.safetensors"
    assert _config("shapes", weights=str(mine)).objective_config.regression_kwargs == {"weights": str(mine)}
    with pytest.raises(Exception, match=r"regression_kwargs: pixel_lpips needs vgg_weights and lpips_weights"):
        _config(str(tmp_path / "my-sd15"))


def test_the_packaged_shapes_pixel_lpips_agrees_with_its_judge_on_held_out_triplets(tmp_path):
    from d2g.shapes import lpips_data
    from d2g.shapes.evaluator import Evaluator
    from distill.lpips.calibrate import two_afc_score
    from distill.lpips.data import load_triplets
    from distill.lpips.pixel import load_pixel_trunk_lpips

    model = load_pixel_trunk_lpips(PACKAGED_PIXEL_LPIPS["shapes"])
    assert (model.latent_channels, model.pools_removed) == (3, 0)
    assert not all(torch.equal(h.model[1].weight, torch.ones_like(h.model[1].weight)) for h in model.lins), (
        "heads still at their uncalibrated init"
    )
    lpips_data.build_triplets(
        tmp_path / "t", 96, shard_size=96, seed=2, batch_size=96, vae=lpips_data.load_vae(),
        evaluator=Evaluator.load(), progress=False, space="pixel",
    )  # fmt: skip
    data = load_triplets(tmp_path / "t")
    with torch.no_grad():
        d0, d1 = model(data.ref, data.p0), model(data.ref, data.p1)
    # Calibrated, the metric ranks most held-out pairs the way the judge does (chance is 0.5; the
    # docs/RESULTS.md table has the figures on 512 triplets).
    assert two_afc_score(d0, d1, data.judge) > 0.7
