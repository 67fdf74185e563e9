"""SD3 teachers without their T5 encoder (`load_teacher(..., drop_t5=True)`), as the stock
StableDiffusion3Pipeline allows: no T5 weights loaded, zeros where the T5 tokens go, the CLIP
part unchanged, and d2g's flow solver runs it."""

from __future__ import annotations

import pytest
import torch

from d2g.teacher.loading import TeacherError, load_teacher, t5_dropped
from d2g.teacher.solver import SolverSettings, TeacherSolver
from store import LATENT, PROMPT_EMBEDS

PROMPTS = ["a red circle", "a blue square"]
MSL = 16


def _settings() -> SolverSettings:
    return SolverSettings(scheduler="flow_euler", steps=2, guidance=0.0, max_sequence_length=MSL,
                          store_prompt_embeds=True)


def test_sd3_without_t5_has_zero_t5_tokens_and_solves(sd3_teacher):
    full = load_teacher(str(sd3_teacher))
    dropped = load_teacher(str(sd3_teacher), drop_t5=True)
    assert dropped.text_encoder_3 is None and dropped.tokenizer_3 is None
    assert t5_dropped(dropped) and not t5_dropped(full)
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with_t5 = TeacherSolver(full, _settings()).solve(PROMPTS, noise)
    solver = TeacherSolver(dropped, _settings())
    without = solver.solve(PROMPTS, noise)
    embeds, reference = without[PROMPT_EMBEDS], with_t5[PROMPT_EMBEDS]
    # SD3's joint tokens: the CLIP tokens (padded to T5's width), then max_sequence_length T5 tokens.
    assert embeds.shape == reference.shape and embeds.shape[1] > MSL
    clip = embeds.shape[1] - MSL
    torch.testing.assert_close(embeds[:, :clip], reference[:, :clip], rtol=0, atol=0)
    assert torch.count_nonzero(embeds[:, clip:]) == 0 and torch.count_nonzero(reference[:, clip:]) > 0
    assert solver.schema()[PROMPT_EMBEDS][1] == tuple(embeds.shape[1:])
    assert torch.isfinite(without[LATENT]).all() and without[LATENT].shape == (2, 16, 16, 16)
    assert not torch.allclose(without[LATENT], with_t5[LATENT]), "the T5 tokens mattered to the teacher"


def test_a_folder_saved_without_t5_loads_as_a_teacher(sd3_teacher, tmp_path):
    """save_pretrained leaves a dropped T5 out (model_index: null), which a plain from_pretrained
    refuses; load_teacher loads such a folder (an export of a drop_t5 teacher's student) without T5."""
    from diffusers import DiffusionPipeline

    load_teacher(str(sd3_teacher), drop_t5=True).save_pretrained(tmp_path / "no-t5")
    with pytest.raises(ValueError, match="text_encoder_3"):
        DiffusionPipeline.from_pretrained(tmp_path / "no-t5")
    assert t5_dropped(load_teacher(str(tmp_path / "no-t5")))


def test_drop_t5_is_refused_for_a_flux_teacher(flux_teacher):
    with pytest.raises(TeacherError, match=r"option drop_t5: only StableDiffusion3Pipeline teachers can drop their "
                                           r"T5 encoder; teacher '.*flux' is a FluxPipeline"):
        load_teacher(str(flux_teacher), drop_t5=True)


def test_pairgen_and_distill_options_load_the_teacher_without_t5(ray_local, sd3_teacher, sd15_teacher, tmp_path):
    from distill.train_config import load_train_config
    from distill.trainer import Trainer
    from pairgen.config import load_config
    from pairgen.fingerprint import build_fingerprint
    from pairgen.prompts import load_prompts
    from pairgen.runner import PairgenRun

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    settings = dict(teacher=str(sd3_teacher), prompts=str(prompts), num_pairs=4, shard_size=4, steps=2,
                    guidance=1.0, batch_size=4, height=32, width=32, max_sequence_length=MSL, seed=0)
    with_t5 = load_config(None, {**settings, "out": str(tmp_path / "a")})
    without = load_config(None, {**settings, "out": str(tmp_path / "b"), "drop_t5": True})
    source = load_prompts(str(prompts))
    assert "drop_t5" not in build_fingerprint(with_t5, source)["teacher"], "old fingerprints unchanged"
    assert build_fingerprint(without, source)["teacher"]["drop_t5"] is True
    with pytest.raises(TeacherError, match="T5"):
        build_fingerprint(load_config(None, {**settings, "teacher": str(sd15_teacher), "out": str(tmp_path / "c"),
                                             "drop_t5": True}), source)
    for config in (with_t5, without):
        PairgenRun(config, progress=False).run()
    from store import PairDataset

    latents = [torch.stack([torch.as_tensor(s[LATENT]) for s in PairDataset(str(tmp_path / d), shuffle=False)])
               for d in "ab"]
    assert not torch.equal(*latents), "the pairs were made without T5"
    trainer = Trainer(load_train_config(None, dict(data=str(tmp_path / "b"), teacher=str(sd3_teacher),
                                                   teacher_drop_t5=True, out=str(tmp_path / "run"),
                                                   objective="regression", max_steps=1, batch_size=2,
                                                   use_ray=False, checkpoint_every=1,
                                                   objective_config={"regression_loss": "mse"})))
    assert t5_dropped(trainer.objective.pipe)
