"""The SD3-layout shapes teacher's training script (`python -m d2g.shapes.train --layout sd3`) at
tiny scale: the latents and unet stages for 3 steps on the SD1.5-layout teacher's components (an
untrained one of the same configs when no trained weights exist), the export loaded back with
from_pretrained as a StableDiffusion3Pipeline whose T5 is a zero encoder, conditioned in training
exactly as its pipeline conditions it, and d2g's flow solver (pairgen's) sampling it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from d2g.shapes import models, sampling, train

PROMPTS = ["a small red circle in the top left on a black background",
           "large blue square, center, white background"]
MSL = 4  # zero T5 tokens trained for (the default, 256, is the full run's)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, exported teacher folder) after the latents stage and 3 transformer steps."""
    root = tmp_path_factory.mktemp("shapes-sd3")
    # The shipped SD1.5-layout teacher's VAE and text encoder when present (saves building a
    # tokenizer), else an untrained one of the same configs.
    shipped = Path(sampling.TEACHER_PATH)
    components = shipped if (shipped / "model_index.json").exists() else \
        models.build_untrained_pipeline(root / "components")
    work, out = root / "work", root / "out"
    common = ["--layout", "sd3", "--workdir", str(work), "--out", str(out), "--threads", "2"]
    assert train.main(["--stage", "latents", "--components-from", str(components), "--latent-items", "64",
                       *common]) == 0
    assert train.main(["--stage", "unet", "--steps", "3", "--max-sequence-length", str(MSL), *common]) == 0
    return work, out / "teacher-sd3"


def test_export_is_a_small_sd3_pipeline_with_a_zero_t5(trained):
    """A plain from_pretrained loads it; its T5 slot encodes every prompt as exact zeros, so the
    teacher loaded without T5 (drop_t5) encodes prompts identically."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from d2g.teacher.loading import load_teacher

    work, folder = trained
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipe, StableDiffusion3Pipeline)
    t5 = pipe._get_t5_prompt_embeds(PROMPTS, max_sequence_length=MSL)
    assert t5.shape == (2, MSL, 128) and torch.count_nonzero(t5) == 0
    dropped = load_teacher(str(folder), drop_t5=True)
    assert dropped.text_encoder_3 is None
    for a, b in zip(pipe.encode_prompt(PROMPTS, None, None, max_sequence_length=MSL, do_classifier_free_guidance=False),
                    dropped.encode_prompt(PROMPTS, None, None, max_sequence_length=MSL,
                                          do_classifier_free_guidance=False), strict=True):
        if a is not None:
            assert torch.equal(a, b)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    for key, value in models.FLOW_SCHEDULER_KWARGS.items():
        assert pipe.scheduler.config[key] == value, key
    assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels == 4
    assert pipe.transformer.config.patch_size == 2 and pipe.vae.config.shift_factor == 0.0
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 20 * 2**20, f"{size / 2**20:.1f} MB"
    assert not list(folder.rglob("*.bin")) and list(folder.glob("transformer/*.safetensors"))
    # The exported transformer is the EMA of 3 steps, not the untrained initialisation.
    fresh = models.build_transformer(0, 4).state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in pipe.transformer.state_dict().items())
    state = torch.load(work / "transformer.ckpt", weights_only=True)
    assert state["step"] == 3 and state["max_sequence_length"] == MSL


def test_training_conditions_the_transformer_as_its_pipeline_does(trained):
    """The stored CLIP tokens and pooled embedding, followed by MSL zeros, are the pipeline's own
    joint embedding of a caption (and of "", the guidance negative, for row 0)."""
    from diffusers import StableDiffusion3Pipeline

    work, folder = trained
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    data = torch.load(work / "latents.pt", weights_only=True)
    assert data["layout"] == "sd3" and data["captions"][0] == ""
    for row in (0, 1):
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=[data["captions"][row] or "x"], prompt_2=None, prompt_3=None, device=torch.device("cpu"),
            do_classifier_free_guidance=True, max_sequence_length=MSL)
        ours = torch.cat([data["embeddings"][row], torch.zeros(MSL, data["embeddings"].shape[-1])])
        theirs, theirs_pooled = (negative, negative_pooled) if row == 0 else (embeds, pooled)
        torch.testing.assert_close(ours, theirs[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(data["pooled"][row], theirs_pooled[0], rtol=1e-5, atol=1e-6)


def test_rectified_flow_loss_is_the_velocity_regression(trained):
    """The loss is the MSE between the transformer's output at x_t and eps - x0, with x_t on the
    straight path: checked against the transformer called by hand at sigma 0 (x_t = x0) and 1."""
    from diffusers import SD3Transformer2DModel

    _, folder = trained
    transformer = SD3Transformer2DModel.from_pretrained(folder / "transformer")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    context, pooled = torch.randn(2, 32 + MSL, 128, generator=g), torch.randn(2, 64, generator=g)
    sigma = torch.tensor([0.0, 1.0])
    with torch.no_grad():
        loss = train.rectified_flow_loss(transformer, x0, noise, sigma, context, pooled)
        inputs = torch.stack([x0[0], noise[1]])  # x_t at sigma 0 is x0, at sigma 1 the noise
        v = transformer(hidden_states=inputs, timestep=torch.tensor([0.0, 1000.0]), encoder_hidden_states=context,
                        pooled_projections=pooled).sample
    assert loss.item() == pytest.approx(((v - (noise - x0)) ** 2).mean().item(), rel=1e-5)
    sigmas = train.logit_normal_sigmas(4096, torch.Generator().manual_seed(1))
    assert 0 < sigmas.min() and sigmas.max() < 1 and abs(sigmas.median().item() - 0.5) < 0.03


def test_pairgen_flow_solver_samples_the_teacher(trained):
    from d2g.teacher.loading import load_teacher
    from d2g.teacher.solver import SolverSettings, TeacherSolver
    from store import LATENT

    _, folder = trained
    pipe = load_teacher(str(folder))
    solver = TeacherSolver(pipe, SolverSettings(scheduler="auto", steps=2, guidance=3.0, max_sequence_length=MSL))
    assert solver.scheduler_name == "flow_euler" and solver.latent_shape == (4, 8, 8)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    latents = solver.solve(PROMPTS, noise)[LATENT]
    assert latents.shape == (2, 4, 8, 8) and torch.isfinite(latents).all()
    assert not torch.allclose(latents, noise)
    # ... and the shapes tools sample it (what `python -m d2g.shapes.evaluate --teacher` runs).
    shapes_pipe = sampling.load_pipeline(folder)
    images = sampling.generate(shapes_pipe, PROMPTS, steps=2, seed=0)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, sampling.generate(shapes_pipe, PROMPTS, steps=2, seed=0))


def test_a_mismatched_layout_or_token_count_is_refused(trained, tmp_path):
    work, _ = trained
    with pytest.raises(SystemExit, match="was encoded for --layout sd3; re-run the latents stage with --layout sd"):
        train.main(["--stage", "unet", "--steps", "1", "--workdir", str(work), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=rf"was trained with --max-sequence-length {MSL}, not 8"):
        train.main(["--layout", "sd3", "--stage", "unet", "--steps", "4", "--resume", "--max-sequence-length", "8",
                    "--workdir", str(work), "--out", str(tmp_path)])
