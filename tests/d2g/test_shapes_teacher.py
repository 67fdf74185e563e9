"""The shapes teachers (SD1.5 and SDXL layouts): offline loading, pinned DDIM, deterministic sampling.

The loading-path tests build an untrained pipeline from the exact shipped configs
(d2g.shapes.models), so they run whether or not trained weights exist. The tests marked
`needs_weights` check the committed, trained teacher itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from d2g.shapes import models, sampling, world

WEIGHTS = Path(sampling.TEACHER_PATH)
needs_weights = pytest.mark.skipif(
    not (WEIGHTS / "model_index.json").exists(),
    reason=f"trained teacher not committed yet at {WEIGHTS} (python -m d2g.shapes.train, docs/SHAPES.md)",
)
PROMPTS = ["a small red circle in the top left on a black background",
           "large blue square, center, white background"]


@pytest.fixture(scope="module")
def untrained(tmp_path_factory) -> Path:
    return models.build_untrained_pipeline(tmp_path_factory.mktemp("shapes_untrained"))


def _sample(pipe, steps: int, seed: int) -> np.ndarray:
    return sampling.generate(pipe, PROMPTS, steps=steps, guidance=3.0, seed=seed)


def test_untrained_pipeline_loads_offline_with_sd15_layout(untrained):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(untrained)
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.safety_checker is None
    assert pipe.vae.config.latent_channels == 4
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert 2 ** (len(pipe.vae.config.block_out_channels) - 1) * pipe.unet.config.sample_size == world.IMAGE_SIZE
    for key, value in models.DDIM_KWARGS.items():
        assert pipe.scheduler.config[key] == value, key
    assert all((untrained / name).is_dir() for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
    assert list(untrained.glob("unet/*.safetensors")) and not list(untrained.rglob("*.bin"))


def test_one_step_ddim_evaluates_the_last_timestep(untrained):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(untrained)
    pipe.scheduler.set_timesteps(1)
    assert pipe.scheduler.timesteps.tolist() == [999]
    pipe.scheduler.set_timesteps(25)
    assert pipe.scheduler.timesteps[0].item() == 999


def test_sampling_is_deterministic_for_a_fixed_seed(untrained):
    pipe = sampling.load_pipeline(untrained)
    a, b, c = _sample(pipe, 3, 0), _sample(pipe, 3, 0), _sample(pipe, 3, 1)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_training_alphas_match_the_scheduler():
    assert torch.allclose(models.alphas_cumprod(), models.build_scheduler().alphas_cumprod)


@needs_weights
def test_shipped_teacher_loads_through_the_alias_and_samples_deterministically():
    from diffusers import StableDiffusionPipeline

    from d2g.teacher.loading import load_teacher

    pipe = load_teacher("shapes")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.vae.config.scaling_factor != 1.0  # computed from the training latents, as SD does
    assert np.array_equal(_sample(pipe, 2, 5), _sample(pipe, 2, 5))


@needs_weights
def test_shipped_weights_fit_the_size_budget():
    """Each teacher at most 20 MB; all of them at most 25 MB. Every teacher folder is a complete
    pipeline a plain `from_pretrained` loads, so the VAE (2.7 MB) is stored once per teacher."""
    root = WEIGHTS.parent

    def size(folder: Path) -> int:
        return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())

    for folder in root.iterdir():
        if folder.is_dir():
            assert size(folder) <= 20 * 2**20, f"{folder} holds {size(folder) / 2**20:.1f} MB, above 20 MB"
    assert size(root) <= 25 * 2**20, f"{root} holds {size(root) / 2**20:.1f} MB, above the 25 MB budget"


@needs_weights
def test_shipped_sdxl_layout_teacher_loads_through_its_alias():
    from diffusers import StableDiffusionXLPipeline

    from d2g.teacher.loading import load_teacher

    pipe = load_teacher("shapes-xl")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.config.force_zeros_for_empty_prompt
    sd = load_teacher("shapes")  # the VAE is shared, scaling factor included
    assert pipe.vae.config.scaling_factor == sd.vae.config.scaling_factor
    assert np.array_equal(_sample(pipe, 2, 5), _sample(pipe, 2, 5))


@pytest.mark.skipif(not (WEIGHTS.parent / "teacher-sd3" / "model_index.json").exists(),
                    reason="SD3-layout teacher not committed (docs/SHAPES.md)")
def test_shipped_sd3_layout_teacher_loads_through_its_alias():
    """A plain from_pretrained folder (its T5 a zero encoder) that samples deterministically with
    the flow solver pairgen uses."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    from d2g.teacher.loading import load_teacher
    from d2g.teacher.noise import batch_noise
    from d2g.teacher.solver import SolverSettings, TeacherSolver
    from d2g.teacher.vae import latent_shape
    from store import LATENT

    pipe = load_teacher("shapes-sd3")
    assert isinstance(pipe, StableDiffusion3Pipeline) and isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.scheduler.config.shift == 1.0 and not pipe.scheduler.config.use_dynamic_shifting
    assert pipe.vae.config.scaling_factor == load_teacher("shapes").vae.config.scaling_factor
    solver = TeacherSolver(pipe, SolverSettings(scheduler="auto", steps=2, guidance=3.0))
    noise = batch_noise(5, [0, 1], latent_shape(pipe))
    first, second = (solver.solve(PROMPTS, noise)[LATENT] for _ in range(2))
    assert torch.equal(first, second) and not torch.allclose(first, noise)


@needs_weights
def test_sdxl_layout_training_conditions_the_unet_as_its_pipeline_does(tmp_path):
    """The latents and unet stages with --layout sdxl, a few steps: the exported pipeline is an
    SDXL one, and the stored text conditioning equals the pipeline's own encoding (zeros for the
    empty prompt, as its guidance uses)."""
    from diffusers import StableDiffusionXLPipeline

    from d2g.shapes import train

    work, out = tmp_path / "work", tmp_path / "out"
    common = ["--layout", "sdxl", "--workdir", str(work), "--out", str(out), "--threads", "1"]
    train.main(["--stage", "latents", "--components-from", str(WEIGHTS), "--latent-items", "64", *common])
    train.main(["--stage", "unet", "--steps", "2", *common])
    pipe = StableDiffusionXLPipeline.from_pretrained(out / "teacher-xl")
    data = torch.load(work / "latents.pt", weights_only=True)
    caption = data["captions"][1]
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=[caption], device=torch.device("cpu"),
                                              do_classifier_free_guidance=False)
    assert torch.allclose(data["embeddings"][1], embeds[0]) and torch.allclose(data["pooled"][1], pooled[0])
    assert data["embeddings"][0].abs().sum() == 0 and data["pooled"][0].abs().sum() == 0
    _, negative, _, negative_pooled = pipe.encode_prompt(prompt=[caption], device=torch.device("cpu"),
                                                         do_classifier_free_guidance=True)
    assert negative.abs().sum() == 0 and negative_pooled.abs().sum() == 0  # what guidance pairs with row 0


def test_an_alias_is_not_shadowed_by_a_folder_of_its_name(tmp_path, monkeypatch):
    """`distill train --teacher shapes-sd3` run from a directory that happens to hold a folder named
    shapes-sd3 (a training workdir) still means the built-in teacher; other local folders become
    absolute for Ray workers, hub ids stay as given."""
    from d2g.teacher.loading import absolute_teacher

    monkeypatch.chdir(tmp_path)
    for name in ("shapes-sd3", "my-teacher"):
        (tmp_path / name).mkdir()
    assert absolute_teacher("shapes-sd3") == "shapes-sd3"
    assert absolute_teacher("my-teacher") == str(tmp_path / "my-teacher")
    assert absolute_teacher("org/model") == "org/model"
