"""Students of flow-matching transformer teachers (tiny SD3 and FLUX): the student calls the
transformer as the stock pipeline does, `distill train` trains the regression objective (MSE and
E-LatentLPIPS on the 16-channel latent spaces) on pair stores of each without decoding, and the
export runs in the stock StableDiffusion3Pipeline / FluxPipeline with the student's own sampler.

Pair stores are written in-process (stock pipeline latents, 2 Euler steps, real shards read back by
the trainer), not by pairgen on Ray, to keep the module fast; pairgen's own flow pairs are tested
in tests/pairgen/test_flow_teachers.py.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from d2g.teacher.loading import load_teacher
from distill.checkpoint import CheckpointStore
from distill.flow_student import FlowGenerator, FlowTextConditioner
from distill.objective_config import parse_objective_config
from distill.objectives import ObjectiveError, make_objective
from store import (
    LATENT,
    NOISE,
    POOLED_PROMPT_EMBEDS,
    PROMPT,
    PROMPT_EMBEDS,
    FieldSpec,
    PairStore,
    Schema,
    layout,
)

PROMPTS = ["a red circle", "a blue square", "a green cat", "a red square"]
MSL = 16  # T5 tokens: the pairs' max_sequence_length, recorded in their fingerprint
GUIDANCE = {"sd3": 0.0, "flux": 3.5}
TEACHERS = {"sd3": "sd3_teacher", "flux": "flux_teacher"}


def _unpacked(pipe, latents: torch.Tensor) -> torch.Tensor:
    if type(pipe).__name__ == "FluxPipeline":
        return pipe._unpack_latents(latents, 32, 32, pipe.vae_scale_factor)
    return latents


def _packed(pipe, latents: torch.Tensor) -> torch.Tensor:
    if type(pipe).__name__ == "FluxPipeline":
        return pipe._pack_latents(latents, latents.shape[0], 16, 16, 16)
    return latents


def _stock(pipe, prompts, noise, steps, guidance):
    return _unpacked(pipe, pipe(prompt=prompts, latents=_packed(pipe, noise.clone()), num_inference_steps=steps,
                                height=32, width=32, max_sequence_length=MSL, output_type="latent",
                                guidance_scale=guidance).images)


def _write_pairs(teacher_path, out: str, family: str, n: int = 8, store_embeds: bool = False) -> str:
    """n pairs of the teacher's 2-step stock-pipeline latents in 2 shards, with a fingerprint that
    records the solver's max_sequence_length and guidance as pairgen's does."""
    pipe = load_teacher(str(teacher_path))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(n, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    with torch.no_grad():
        latents = _stock(pipe, prompts, noise, 2, GUIDANCE[family])
        cond = FlowTextConditioner(pipe, MSL).encode(prompts)
    fields = {NOISE: FieldSpec("float32", (16, 16, 16)), LATENT: FieldSpec("float32", (16, 16, 16))}
    if store_embeds:
        fields[PROMPT_EMBEDS] = FieldSpec("float32", tuple(cond.prompt_embeds.shape[1:]))
        fields[POOLED_PROMPT_EMBEDS] = FieldSpec("float32", tuple(cond.pooled.shape[1:]))
    st = PairStore(out)
    st.ensure_fingerprint({"teacher": {"name": str(teacher_path)}, "solver": {
        "scheduler": "flow_euler", "steps": 2, "guidance": GUIDANCE[family], "max_sequence_length": MSL}})
    infos = []
    for shard in range(2):
        with st.open_shard_writer(layout.shard_name(shard), Schema(fields)) as w:
            for i in range(shard * n // 2, (shard + 1) * n // 2):
                arrays = {NOISE: noise[i].numpy(), LATENT: latents[i].numpy()}
                if store_embeds:
                    arrays[PROMPT_EMBEDS] = cond.prompt_embeds[i].numpy()
                    arrays[POOLED_PROMPT_EMBEDS] = cond.pooled[i].numpy()
                w.write(layout.default_key(i), i, prompts[i], i, arrays)
        infos.append(w.info)
    st.commit(infos, None)
    return out


@pytest.fixture(scope="module")
def pairs(sd3_teacher, flux_teacher, tmp_path_factory) -> dict[str, str]:
    """A pair store per family (SD3's with stored text embeddings, FLUX's with prompts only)."""
    root = tmp_path_factory.mktemp("flow-pairs")
    return {"sd3": _write_pairs(sd3_teacher, str(root / "sd3"), "sd3", store_embeds=True),
            "flux": _write_pairs(flux_teacher, str(root / "flux"), "flux")}


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_student_at_init_is_the_stock_pipelines_one_step(family, request):
    """At initialisation the student's x0 = eps - v(eps, 1) is the stock pipeline's one Euler step
    (timestep scaling, FLUX's packing, ids and guidance embedding as the pipeline passes them)."""
    pipe = load_teacher(str(request.getfixturevalue(TEACHERS[family])))
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    cond = FlowTextConditioner(pipe, MSL, guidance=3.5)({PROMPT: PROMPTS[:2], NOISE: noise})
    ours = FlowGenerator(pipe.transformer, family)(noise, None, cond)
    theirs = _stock(pipe, PROMPTS[:2], noise, 1, GUIDANCE[family])
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    if family == "flux":  # the guidance embedding is really used: another value, another output
        other = FlowTextConditioner(pipe, MSL, guidance=1.0)({PROMPT: PROMPTS[:2], NOISE: noise})
        assert not torch.allclose(FlowGenerator(pipe.transformer, family)(noise, None, other), ours)


def _train(pairs_url, teacher, out, objective="regression", **objective_config):
    from distill.train_config import load_train_config
    from distill.trainer import Trainer

    config = load_train_config(None, dict(
        data=pairs_url, teacher=str(teacher), out=str(out), objective=objective, objective_config=objective_config,
        max_steps=3, batch_size=2, checkpoint_every=3, log_every=1, use_ray=False, lr_g=1e-3, lr_d=1e-3,
        shuffle_block=4, seed=0, **({"ema_decay": 0} if objective != "regression" else {})))
    return Trainer(config)


@pytest.fixture
def no_decoding(monkeypatch):
    """Any VAE decode during training fails the test."""
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import Decoder

    def forbidden(*args, **kwargs):
        raise AssertionError("the VAE decoder was called during training")

    monkeypatch.setattr(AutoencoderKL, "decode", forbidden)
    monkeypatch.setattr(Decoder, "forward", forbidden)


@pytest.mark.parametrize(("family", "loss"), [("sd3", "mse"), ("flux", "e_latent_lpips")])
def test_regression_trains_without_decoding(family, loss, pairs, request, tmp_path, no_decoding):
    teacher = request.getfixturevalue(TEACHERS[family])
    kwargs = {"regression_kwargs": {"allow_random": True, "width": 0.125}} if loss == "e_latent_lpips" else {}
    trainer = _train(pairs[family], teacher, tmp_path / "run", regression_loss=loss, **kwargs)
    obj = trainer.objective
    assert obj.conditioner.max_sequence_length == MSL, "the T5 length is the pairs' (from their fingerprint)"
    if loss == "e_latent_lpips":  # the 16-channel FLUX latent space, from the teacher's VAE config
        space = obj.regression.net.latent_space
        assert (obj.regression.net.latent_channels, space.scale, space.shift) == (16, 0.3611, 0.1159)
    before = {k: v.clone() for k, v in obj.generator.state_dict().items()}
    summary = trainer.run(progress=False)
    assert summary.steps == 3
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["g/regression"])) for r in rows)
    saved = CheckpointStore(str(tmp_path / "run")).load(3, ["generator", "ema"])[0]
    weights = saved["generator"]
    assert set(weights) == set(before) and all(k.startswith("transformer.") for k in weights)
    assert set(saved["ema"]) == set(before), "the EMA of the student is kept (export uses it by default)"
    assert any(not torch.equal(weights[k], before[k]) for k in before), "the student trained"
    with pytest.raises(AssertionError, match="VAE decoder"):  # the trap is armed
        trainer.pipe.vae.decode(torch.zeros(1, 16, 4, 4))


@pytest.mark.parametrize(("family", "objective"), [("sd3", "ladd"), ("flux", "ladd"), ("sd3", "d2g"),
                                                   ("flux", "d2g")])
def test_adversarial_objectives_train_without_decoding(family, objective, pairs, request, tmp_path, no_decoding):
    """ladd (a 2-step student, frozen-teacher token features) and d2g (a trainable transformer
    copy, z through a zero-initialised patch embedding) train through `distill train`, R1 every step."""
    teacher = request.getfixturevalue(TEACHERS[family])
    options = {"r1_every": 1, **({"student_steps": 2} if objective == "ladd" else
                                 {"regression_loss": "mse", "mix_and_match": 0.5})}  # 1 of each batch of 2
    trainer = _train(pairs[family], teacher, tmp_path / "run", objective=objective, **options)
    disc = trainer.objective.discriminator
    assert type(disc).__name__ == ("FlowLADDDiscriminator" if objective == "ladd" else "FlowD2GDiscriminator")
    before = {k: v.clone() for k, v in disc.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in trainer.pipe.transformer.state_dict().items()}
    trainer.run(progress=False)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert all(torch.isfinite(torch.tensor(row[k])) for k in ("g/gan", "d/real", "d/fake", "d/r1"))
    after = CheckpointStore(str(tmp_path / "run")).load(3, ["discriminator"])[0]["discriminator"]
    assert set(after) == set(before) and any(not torch.equal(after[k], before[k]) for k in before)
    if objective == "d2g":  # z enters the token stream: its zero-initialised embedding trained away from 0
        assert after["z_embed.weight"].abs().sum() > 0 and before["z_embed.weight"].abs().sum() == 0
    else:  # only the heads train; the teacher the features come from stays frozen and unchanged
        assert all(k.startswith("heads.") for k in after)
    assert all(torch.equal(v, teacher_before[k]) for k, v in trainer.pipe.transformer.state_dict().items())


def test_d2g_discriminator_reads_tokens_of_the_chosen_blocks(flux_teacher):
    from distill.discriminators.flow import FlowD2GDiscriminator

    pipe = load_teacher(str(flux_teacher))
    make = functools.partial(FlowD2GDiscriminator, pipe.transformer, "flux")
    disc = make()
    assert disc.tap_names == ["block0", "single0"] and len(disc.heads) == 2
    assert make(token_blocks=["single0"]).tap_names == ["single0"]
    g = torch.Generator().manual_seed(0)
    x, z, z2 = (torch.randn(2, 16, 16, 16, generator=g) for _ in range(3))
    cond = FlowTextConditioner(pipe, MSL)({PROMPT: PROMPTS[:2], NOISE: x})
    with torch.no_grad():
        # Zero-initialised: z does not change the logits at step 0; once trained, it does.
        torch.testing.assert_close(disc(x, cond, z), disc(x, cond, z2))
        disc.z_embed.weight.normal_(generator=g)
        assert not torch.allclose(disc(x, cond, z), disc(x, cond, z2))
    with pytest.raises(ObjectiveError, match=r"objective 'd2g': d2g_token_blocks: unknown transformer block "
                                             r"'block7'; choose from \['block0', 'single0'\]"):
        make_objective("d2g", pipe, parse_objective_config("d2g", {"d2g_token_blocks": ["block7"],
                                                                   "regression_loss": "mse"}))


def _export_run(teacher, tmp_path, family: str, steps: int, pairs_url: str):
    """A checkpoint holding a perturbed copy of the teacher transformer as a `steps`-step student
    (no training: export is what is tested), exported with distill.export.export_student."""
    from distill.export import export_student
    from distill.train_config import TrainConfig

    pipe = load_teacher(str(teacher))
    student = FlowGenerator(pipe.transformer, family)
    generator = torch.Generator().manual_seed(steps)
    with torch.no_grad():  # not the teacher any more, so an export that kept the teacher fails
        for p in student.parameters():
            p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=generator))
    config = TrainConfig(data=pairs_url, teacher=str(teacher), out=str(tmp_path / "run"), objective="regression",
                         objective_config={"student_steps": steps}, use_ray=False)
    run = tmp_path / f"run-{family}-{steps}"
    CheckpointStore(str(run)).save(5, {"generator": student.state_dict()}, {},
                                   {"config": config.model_dump(mode="json"), "step": 5})
    out = tmp_path / f"export-{family}-{steps}"
    return student, out, lambda: export_student(str(run), str(out))


@pytest.mark.parametrize(("family", "steps"), [("sd3", 1), ("sd3", 2), ("flux", 1), ("flux", 2)])
def test_stock_pipeline_reproduces_the_student(family, steps, pairs, request, tmp_path):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from distill.export import load_student, student_latents

    teacher = request.getfixturevalue(TEACHERS[family])
    student, out, export = _export_run(teacher, tmp_path, family, steps, pairs[family])
    info = export()
    assert info["num_inference_steps"] == steps and info["max_sequence_length"] == MSL
    assert info["guidance_scale"] == GUIDANCE[family]
    stock = DiffusionPipeline.from_pretrained(out)
    stock.set_progress_bar_config(disable=True)
    assert isinstance(stock.scheduler, FlowMatchEulerDiscreteScheduler) and stock.scheduler.config.shift == 1.0
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(11)  # the between-step noise (2 steps) comes from torch's global RNG in both
    theirs = _stock(stock, PROMPTS[:2], noise, steps, info["guidance_scale"])
    torch.manual_seed(11)
    ours = student_latents(load_student(str(out)), PROMPTS[:2], noise, max_sequence_length=MSL)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # ... and it is the trained student's own sampler, not the teacher's.
    cond = FlowTextConditioner(load_teacher(str(teacher)), MSL, guidance=3.5)({PROMPT: PROMPTS[:2], NOISE: noise})
    torch.manual_seed(11)
    torch.testing.assert_close(student.sample(noise, cond, steps), ours, rtol=1e-5, atol=1e-5)
    teacher_pipe = load_teacher(str(teacher))
    teacher_pipe.set_progress_bar_config(disable=True)
    assert not torch.allclose(_stock(teacher_pipe, PROMPTS[:2], noise, 1, GUIDANCE[family]), ours, atol=1e-3)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_the_stock_schedulers_grid_is_the_students(steps):
    """Both stock pipelines' ways of setting the grid (SD3: the scheduler's own from a step count;
    FLUX: the sigmas passed in) give the student's linspace(1, 1/N, N), and timesteps sigma * 1000."""
    from distill.flow_student import flow_student_scheduler

    grid = torch.linspace(1, 1 / steps, steps)
    for how in ({"num_inference_steps": steps}, {"sigmas": grid.numpy()}):
        scheduler = flow_student_scheduler(steps)
        scheduler.set_timesteps(**how)
        torch.testing.assert_close(scheduler.sigmas[:-1], grid, rtol=0, atol=1e-6)
        torch.testing.assert_close(scheduler.timesteps, grid * 1000, rtol=0, atol=1e-3)


def test_unsupported_options_are_refused_in_one_line(flux_teacher):
    from distill.objective_config import LoRASettings, MemoryOptions

    pipe = load_teacher(str(flux_teacher))
    with pytest.raises(ObjectiveError, match=r"objective 'add': score distillation \(lambda_sd 2.5\) is not "
                                             r"supported for FluxPipeline teachers; set lambda_sd 0"):
        make_objective("add", pipe)
    with pytest.raises(ObjectiveError, match="objective 'regression': LoRA students and discriminators are not "
                                             "supported for FluxPipeline teachers"):
        make_objective("regression", pipe, memory=MemoryOptions(generator_lora=LoRASettings(4, 4.0)))


def test_gradient_checkpointing_gives_the_same_gradients(flux_teacher):
    """The switch reaches the student's and the d2g discriminator's transformers, and recomputing in
    backward (hooks that stop the forward included) changes no loss or gradient."""
    pipe = load_teacher(str(flux_teacher))
    g = torch.Generator().manual_seed(2)
    batch = {NOISE: torch.randn(2, 16, 16, 16, generator=g), LATENT: torch.randn(2, 16, 16, 16, generator=g),
             PROMPT: PROMPTS[:2]}
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        obj = make_objective("d2g", pipe, parse_objective_config("d2g", {
            "regression_loss": "mse", "r1_every": 1, "gradient_checkpointing": checkpointing}))
        assert obj.generator.transformer.is_gradient_checkpointing == checkpointing
        assert obj.discriminator.transformer.is_gradient_checkpointing == checkpointing
        torch.manual_seed(1)
        obj.discriminator_loss(batch, 0)[0].backward()
        obj.generator_loss(batch, 1)[0].backward()
        grads.append([p.grad.clone() for m in (obj.generator, obj.discriminator) for p in m.parameters()
                      if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_stored_embeddings_and_seeded_sampling(sd3_teacher):
    """Stored prompt embeddings give the same conditioning as encoding; a generator-seeded 2-step
    sample (previews) is reproducible and leaves torch's global RNG (the training stream) alone."""
    from distill.conditioning import ConditioningError

    pipe = load_teacher(str(sd3_teacher))
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    conditioner = FlowTextConditioner(pipe, MSL)
    encoded = conditioner({PROMPT: PROMPTS[:2], NOISE: noise})
    stored = conditioner({PROMPT_EMBEDS: encoded.prompt_embeds, POOLED_PROMPT_EMBEDS: encoded.pooled, NOISE: noise})
    assert torch.equal(stored.prompt_embeds, encoded.prompt_embeds) and torch.equal(stored.pooled, encoded.pooled)
    with pytest.raises(ConditioningError, match="'prompt_embeds' without 'pooled_prompt_embeds'"):
        conditioner({PROMPT_EMBEDS: encoded.prompt_embeds, NOISE: noise})
    student = FlowGenerator(pipe.transformer, "sd3")
    state = torch.get_rng_state()

    def seeded():
        return [torch.Generator().manual_seed(i) for i in range(2)]

    first = student.sample(noise, encoded, 2, generator=seeded())
    assert torch.equal(torch.get_rng_state(), state)
    torch.testing.assert_close(student.sample(noise, encoded, 2, generator=seeded()), first, rtol=0, atol=0)
    assert not torch.allclose(student.sample(noise, encoded, 1), first)
