"""An exported 1-, 2- or 4-step student runs in a stock diffusers pipeline exactly as it was trained
to sample: `DiffusionPipeline.from_pretrained(export)` with `latents=` the starting noise and a
seeded `generator` gives the training-time sampler's latents (`OneStepGenerator.sample` with a
generator seeded the same), for the SD1.5 and the SDXL layouts.

The checkpoint is written directly (a perturbed copy of the tiny teacher's UNet, no training), so
the whole module takes seconds; the export itself goes through `distill.export.export_student` as a
user's would.
"""

from __future__ import annotations

import json

import pytest
import torch

from distill.checkpoint import CheckpointStore
from distill.conditioning import TextConditioner
from distill.export import StudentStepsError, export_student, load_student, recommended_steps, student_latents
from distill.generator import NoiseSchedule, OneStepGenerator, seeded_noise, student_scheduler
from distill.train_config import TrainConfig
from tests.helpers.objectives import PROMPTS, ddim_trailing

STEPS = (1, 2, 4)


def _load(path):
    from d2g.teacher.loading import load_teacher

    return load_teacher(str(path))


def _export(teacher_path, tmp_path, steps: int, objective: str = "regression"):
    """A run whose one checkpoint holds a perturbed copy of the teacher UNet as a `steps`-step
    student, exported; returns (the student module, the export folder)."""
    pipe = _load(teacher_path)
    student = OneStepGenerator(pipe.unet, pipe.scheduler)
    generator = torch.Generator().manual_seed(steps)
    with torch.no_grad():  # not the teacher any more, so an export that kept the teacher's UNet fails
        for p in student.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=generator))
    config = TrainConfig(data=str(tmp_path / "no-pairs"), teacher=str(teacher_path), out=str(tmp_path / "run"),
                         objective=objective, objective_config={"student_steps": steps}, use_ray=False)
    run = tmp_path / f"run-{steps}"
    CheckpointStore(str(run)).save(5, {"generator": student.state_dict()}, {},
                                   {"config": config.model_dump(mode="json"), "step": 5})
    out = tmp_path / f"export-{steps}"
    info = export_student(str(run), str(out))
    assert info["num_inference_steps"] == info["student_steps"] == steps
    return pipe, student, out


def _run_stock(stock, prompts: list[str], noise: torch.Tensor, steps: int, seed: int = 7) -> torch.Tensor:
    """The stock pipeline's latents from `noise`, its between-step noise drawn from a generator seeded `seed`."""
    size = noise.shape[-1] * stock.vae_scale_factor
    return stock(prompt=prompts, latents=noise.clone(), num_inference_steps=steps, guidance_scale=0.0,
                 output_type="latent", height=size, width=size, generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("teacher", ["sd15_teacher", "sdxl_teacher"])
def test_stock_pipeline_equals_the_training_time_sampler(teacher, request, tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler

    teacher_path = request.getfixturevalue(teacher)
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = PROMPTS[:3]
    for steps in STEPS:
        pipe, student, out = _export(teacher_path, tmp_path, steps)
        stock = DiffusionPipeline.from_pretrained(out)
        stock.set_progress_bar_config(disable=True)
        assert isinstance(stock.scheduler, LCMScheduler)

        cond = TextConditioner(pipe)({"noise": noise, "prompt": prompts}, (8, 8))
        ours = student.sample(noise, cond, steps=steps, generator=torch.Generator().manual_seed(7))
        theirs = _run_stock(stock, prompts, noise, steps)
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
        # d2g's own pipeline-free sampler on the export (generate, eval) agrees too.
        exported = student_latents(load_student(str(out)), prompts, noise, steps,
                                   generator=torch.Generator().manual_seed(7))
        torch.testing.assert_close(exported, ours, rtol=1e-5, atol=1e-5)
        # The card and STUDENT_INFO name the steps; fewer steps run a subset of the trained grid.
        assert recommended_steps(str(out)) == steps
        assert f"num_inference_steps={steps}" in (out / "README.md").read_text()
        assert json.loads((out / "d2g_student.json").read_text())["num_inference_steps"] == steps
        if steps > 1:
            # Another seed changes the between-step noise, hence the result: the noise is really used.
            assert not torch.allclose(_run_stock(stock, prompts, noise, steps, seed=8), theirs, atol=1e-4)
            fewer = student.sample(noise, cond, steps=steps // 2, generator=torch.Generator().manual_seed(7),
                                   trained_steps=steps)
            torch.testing.assert_close(_run_stock(stock, prompts, noise, steps // 2), fewer, rtol=1e-5, atol=1e-5)
            # The scheduler d2g used to export (DDIM, trailing, set_alpha_to_one) does not re-noise
            # with fresh noise: at more than one step this test tells it apart.
            stock.scheduler = ddim_trailing(stock, steps)
            assert not torch.allclose(_run_stock(stock, prompts, noise, steps), ours, atol=1e-3)


def test_generate_noise_is_reproducible_in_a_stock_pipeline(sd15_teacher, tmp_path):
    """`distill generate` image i: starting and between-step noise from one generator seeded
    sample_seed(seed, i); the same generators in a stock pipeline (no latents) give the same image."""
    from diffusers import DiffusionPipeline

    from d2g.teacher.noise import sample_noise, sample_seed

    _, _, out = _export(sd15_teacher, tmp_path, 2)
    seed, indices, shape = 11, [0, 1, 2], (4, 8, 8)
    noise, generators = seeded_noise(seed, indices, shape)
    torch.testing.assert_close(noise[1], sample_noise(seed, 1, shape), rtol=0, atol=0)
    ours = student_latents(load_student(str(out)), PROMPTS[:3], noise, 2, generators)
    stock = DiffusionPipeline.from_pretrained(out)
    stock.set_progress_bar_config(disable=True)
    theirs = stock(prompt=PROMPTS[:3], num_inference_steps=2, guidance_scale=0.0, output_type="latent",
                   height=16, width=16,
                   generator=[torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]).images
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    with pytest.raises(StudentStepsError, match="trained for 2 steps; give 1 to 2"):
        student_latents(load_student(str(out)), PROMPTS[:3], noise, 4)


def test_generate_and_eval_run_the_recommended_steps(sd15_teacher, tmp_path, capsys):
    """`distill generate` and `distill eval` default to the export's recommended steps, take
    `--steps` fewer, and refuse more in one line (exit 2)."""
    from PIL import Image

    from distill.cli import main
    from distill.evaluate import evaluate
    from tests.helpers.store_data import make_dataset

    _, _, out = _export(sd15_teacher, tmp_path, 2)
    assert main(["generate", str(out), "--prompt", "a red circle", "--out", str(tmp_path / "png")]) == 0
    assert main(["generate", str(out), "--prompt", "a red circle", "--steps", "1", "--out", str(tmp_path / "png")]) == 0
    steps = [Image.open(tmp_path / "png" / f"image-00{i}.png").text["steps"] for i in (0, 1)]
    assert steps == ["2", "1"]
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "a red circle", "--steps", "3", "--out", str(tmp_path / "png")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "distill: error: --steps 3: this student was trained for 2 steps; give 1 to 2"

    data = str(tmp_path / "heldout")
    make_dataset(data, shards=1, per_shard=4)
    two = evaluate(str(out), data, num=4, batch_size=4, teacher_steps=2, latency_repeats=1)
    one = evaluate(str(out), data, num=4, batch_size=4, teacher_steps=2, latency_repeats=1, steps=1)
    assert (two["steps"], one["steps"]) == (2, 1) and two["student_mse"] != one["student_mse"]
    # Deterministic: the between-step noise is keyed by each pair's starting noise.
    again = evaluate(str(out), data, num=4, batch_size=2, teacher_steps=2, latency_repeats=1)
    assert again["student_mse"] == pytest.approx(two["student_mse"], rel=1e-5)
    with pytest.raises(StudentStepsError):
        evaluate(str(out), data, num=4, steps=3)


def test_student_grid_is_the_lcm_schedulers(sd15_teacher):
    """For every trained step count 1-4 and every fewer step count, the pinned LCMScheduler's
    timesteps are the student's grid; T/N-spaced trailing grids where N divides T."""
    pipe = _load(sd15_teacher)
    schedule = NoiseSchedule(pipe.scheduler)
    for trained in (1, 2, 3, 4):
        scheduler = student_scheduler(dict(pipe.scheduler.config), trained)
        for steps in range(1, trained + 1):
            scheduler.set_timesteps(steps)
            assert scheduler.timesteps.tolist() == schedule.student_grid(steps, trained), (trained, steps)
        with pytest.raises(ValueError):
            scheduler.set_timesteps(trained + 1)  # the stock pipeline refuses untrained steps too
        with pytest.raises(ValueError, match="trained for"):
            schedule.student_grid(trained + 1, trained)
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(min(schedule.student_grid(trained)))
        assert c_out == 1.0 and c_skip < 1e-20
    assert schedule.student_grid(4) == [999, 749, 499, 249] == schedule.trailing_grid(4)
    assert schedule.student_grid(2) == [999, 499] and schedule.student_grid(1) == [999]
    assert schedule.student_grid(2, 4) == [999, 499]
