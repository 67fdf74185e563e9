"""The flow-matching solver (SD3- and FLUX-style teachers) is the stock pipeline's own solve: same
latents for the same noise and prompt, pinned schedulers, FLUX's packed layout stored unpacked."""

from __future__ import annotations

import pytest
import torch

from d2g.teacher.flow import pack, pack_tokens, unpack, unpack_tokens
from d2g.teacher.loading import load_teacher
from d2g.teacher.noise import batch_noise
from d2g.teacher.schedulers import FlowShift, SchedulerError, build_scheduler, flow_solver_kwargs
from d2g.teacher.solver import SolverSettings, TeacherSolver

PROMPTS = ["a red circle", "a blue square"]
SIZE = dict(height=32, width=32, max_sequence_length=16)


def _stock(path, scheduler=None):
    """The stock pipeline, loaded the ordinary way, with its own scheduler unless one is given."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = scheduler
    return pipe


def _stock_latent(pipe, prompts, noise, steps, **call):
    """The stock pipeline's latent for `noise` [B, 16, h, w]: FLUX's noise packed with
    FluxPipeline's own packing first and its result unpacked after."""
    from diffusers import FluxPipeline

    flux = isinstance(pipe, FluxPipeline)
    b, c, h, w = noise.shape
    latents = FluxPipeline._pack_latents(noise, b, c, h, w) if flux else noise
    out = pipe(prompt=prompts, latents=latents, num_inference_steps=steps, height=32, width=32,
               max_sequence_length=16, output_type="latent", **call).images
    return FluxPipeline._unpack_latents(out, 32, 32, pipe.vae_scale_factor) if flux else out


CASES = {
    # name: (teacher fixture, solver settings, stock pipeline call kwargs, stock scheduler or None)
    "sd3-euler-cfg": ("sd3_teacher", dict(scheduler="auto", guidance=3.0), dict(guidance_scale=3.0), None),
    "sd3-heun-cfg": ("sd3_teacher", dict(scheduler="flow_heun", guidance=2.0), dict(guidance_scale=2.0), "heun"),
    "flux-euler-embedded": ("flux_teacher", dict(scheduler="flow_euler", guidance=3.5), dict(guidance_scale=3.5), None),
    "flux-euler-true-cfg": ("flux_teacher", dict(guidance=3.5, true_cfg=2.0),
                            dict(guidance_scale=3.5, true_cfg_scale=2.0, negative_prompt=""), None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_stored_latent_equals_the_stock_pipelines_own_result(request, case):
    fixture, settings, call, scheduler = CASES[case]
    path = request.getfixturevalue(fixture)
    solver = TeacherSolver(load_teacher(str(path)), SolverSettings(steps=3, **SIZE, **settings))
    assert solver.latent_shape == (16, 16, 16), "16 latent channels, unpacked, whatever the denoiser's layout"
    if scheduler == "heun":
        from diffusers import FlowMatchHeunDiscreteScheduler

        # Built by hand with the teacher's shift (SD3's 3.0), not by our code.
        scheduler = FlowMatchHeunDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    stock = _stock(path, scheduler)
    noise = batch_noise(0, [0, 1], solver.latent_shape)

    single = solver.solve(PROMPTS[:1], noise[:1])
    assert torch.equal(single["latent"], _stock_latent(stock, PROMPTS[:1], noise[:1], 3, **call)), \
        "a batch of one is bit-identical to the stock pipeline"
    assert torch.equal(single["noise"], noise[:1]), "the noise is stored unpacked, exactly as drawn"

    batch = solver.solve(PROMPTS, noise)
    # Batched text encoding (and the negative embedding encoded once, then expanded) may differ
    # from the stock pipeline's batch in the last bits; nothing more.
    torch.testing.assert_close(batch["latent"], _stock_latent(stock, PROMPTS, noise, 3, **call), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(batch["latent"][0], batch["latent"][1]), "different prompts and noise, different latents"


def test_shift_overrides_run_the_stock_scheduler_with_those_settings(flux_teacher):
    from diffusers import FlowMatchEulerDiscreteScheduler

    flow = FlowShift(shift=2.0, dynamic_shifting=False)
    solver = TeacherSolver(load_teacher(str(flux_teacher)),
                           SolverSettings(steps=2, guidance=3.5, flow=flow, **SIZE))
    noise = batch_noise(3, [0], solver.latent_shape)
    got = solver.solve(PROMPTS[:1], noise)["latent"]
    stock = _stock(flux_teacher)
    overridden = FlowMatchEulerDiscreteScheduler.from_config(stock.scheduler.config, shift=2.0, use_dynamic_shifting=False)
    expected = _stock_latent(_stock(flux_teacher, overridden), PROMPTS[:1], noise, 2, guidance_scale=3.5)
    assert torch.equal(got, expected)
    default = _stock_latent(stock, PROMPTS[:1], noise, 2, guidance_scale=3.5)
    assert not torch.allclose(got, default), "the teacher's dynamic shifting gives another trajectory"


@pytest.mark.parametrize("fixture,scheduler", [("sd3_teacher", "flow_euler"), ("sd3_teacher", "flow_heun"),
                                               ("flux_teacher", "flow_euler")])
def test_trajectory_points_are_the_stock_solves_finished_steps(request, fixture, scheduler):
    path = request.getfixturevalue(fixture)
    settings = SolverSettings(scheduler=scheduler, steps=4, guidance=2.0, trajectory_points=1, **SIZE)
    solver = TeacherSolver(load_teacher(str(path)), settings)
    noise = batch_noise(1, [0], solver.latent_shape)
    out = solver.solve(PROMPTS[:1], noise)
    assert tuple(out["trajectory"].shape) == (1, 1, 16, 16, 16)
    # Point after step 1 (of 0..3). Heun calls back twice per step; step k ends at call 2k+1.
    stock = _stock(path, build_scheduler(scheduler, dict(_stock(path).scheduler.config)))
    call_index = 3 if scheduler == "flow_heun" else 1
    seen = {}

    def keep(pipe, i, t, kwargs):
        seen[i] = kwargs["latents"].clone()
        return kwargs

    _stock_latent(stock, PROMPTS[:1], noise, 4, guidance_scale=2.0, callback_on_step_end=keep)
    expected = seen[call_index]
    if expected.dim() == 3:  # FLUX: packed tokens
        expected = unpack(stock, expected, 32, 32)
    assert torch.equal(out["trajectory"][:, 0], expected)
    (timestep,) = solver.trajectory_timesteps()
    sigmas = torch.unique_consecutive(stock.scheduler.sigmas)
    assert timestep == pytest.approx(float(sigmas[2]) * 1000, rel=1e-6), "the timestep the next step starts from"


@pytest.mark.parametrize("fixture", ["sd3_teacher", "flux_teacher"])
def test_prompt_embeddings_are_the_pipelines_encoding(request, fixture):
    path = request.getfixturevalue(fixture)
    solver = TeacherSolver(load_teacher(str(path)), SolverSettings(steps=2, store_prompt_embeds=True, **SIZE))
    out = solver.solve(PROMPTS, batch_noise(0, [0, 1], solver.latent_shape))
    schema = solver.schema()
    assert set(schema) == {"noise", "latent", "prompt_embeds", "pooled_prompt_embeds"}
    for name, (_, shape) in schema.items():
        assert tuple(out[name].shape[1:]) == shape, name
    stock = _stock(path)
    if fixture == "flux_teacher":
        embeds, pooled, _ = stock.encode_prompt(prompt=PROMPTS[1:], prompt_2=None, max_sequence_length=16)
        assert schema["prompt_embeds"][1] == (16, 32), "FLUX's token embeddings are T5's, max_sequence_length long"
    else:
        embeds, _, pooled, _ = stock.encode_prompt(prompt=PROMPTS[1:], prompt_2=None, prompt_3=None,
                                                   do_classifier_free_guidance=False, max_sequence_length=16)
        assert schema["prompt_embeds"][1] == (77 + 16, 64), "SD3: CLIP's 77 tokens then T5's"
    torch.testing.assert_close(out["prompt_embeds"][1:], embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["pooled_prompt_embeds"][1:], pooled, rtol=1e-5, atol=1e-5)


def test_packing_is_the_pipelines_and_round_trips(flux_teacher):
    pipe = load_teacher(str(flux_teacher))
    noise = batch_noise(0, [0, 1], (16, 16, 16))
    tokens = pack(pipe, noise)
    assert tuple(tokens.shape) == (2, 64, 64), "8x8 tokens of 2x2x16 values"
    assert torch.equal(tokens[0, 0, :4], noise[0, 0, :2, :2].reshape(4)), "token 0 holds channel 0's top-left 2x2 first"
    assert torch.equal(unpack(pipe, tokens, 32, 32), noise)
    # The pipeline-free packing the students use is the same permutation.
    assert torch.equal(pack_tokens(noise), tokens)
    assert torch.equal(unpack_tokens(tokens, 16, 16), noise)


def test_settings_that_do_not_fit_the_teacher_are_refused(sd3_teacher, flux_teacher, sd15_teacher):
    sd3, flux, sd15 = (load_teacher(str(p)) for p in (sd3_teacher, flux_teacher, sd15_teacher))
    refusals = [
        (sd3, dict(scheduler="ddim"), r"scheduler: 'ddim' is a solver for UNet .* flow-matching"),
        (sd15, dict(scheduler="flow_euler"), r"scheduler: 'flow_euler' is a solver for flow-matching"),
        (flux, dict(scheduler="flow_heun"), r"scheduler: flow_heun cannot run a FLUX teacher"),
        (sd3, dict(true_cfg=2.0), r"option true_cfg"),
        (sd3, dict(guidance_rescale=0.5), r"option guidance_rescale"),
        (sd15, dict(flow=FlowShift(shift=2.0)), r"option flow_shift: applies only to flow-matching"),
        (sd15, dict(max_sequence_length=16), r"option max_sequence_length"),
        (sd3, dict(scheduler="flow_heun", flow=FlowShift(dynamic_shifting=True)), r"flow_heun .* no dynamic"),
    ]
    for pipe, settings, message in refusals:
        with pytest.raises(SchedulerError, match=message):
            TeacherSolver(pipe, SolverSettings(steps=2, **settings))
    with pytest.raises(ValueError, match="multiples of 4"):
        TeacherSolver(flux, SolverSettings(steps=2, height=34, width=32))


def test_flow_scheduler_kwargs_are_pinned_not_inherited():
    # A teacher config with solver settings that must NOT leak into our solver.
    teacher = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
               "use_karras_sigmas": True, "invert_sigmas": True, "stochastic_sampling": True}
    kwargs = flow_solver_kwargs("flow_euler", teacher)
    assert kwargs["shift"] == 3.0 and kwargs["use_dynamic_shifting"] is False
    assert not (kwargs["use_karras_sigmas"] or kwargs["invert_sigmas"] or kwargs["stochastic_sampling"])
    built = build_scheduler("auto", teacher).config
    assert built.shift == 3.0 and built.use_karras_sigmas is False and built.stochastic_sampling is False
    heun = build_scheduler("flow_heun", teacher, flow=FlowShift(shift=1.5))
    assert type(heun).__name__ == "FlowMatchHeunDiscreteScheduler" and heun.config.shift == 1.5


def test_unsupported_transformer_pipelines_are_named():
    from d2g.teacher.flow import UnsupportedTeacher, kind_of_index

    assert kind_of_index({"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]}) == "flux"
    assert kind_of_index({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}) == "unet"
    with pytest.raises(UnsupportedTeacher, match="FluxFillPipeline is not supported"):
        kind_of_index({"_class_name": "FluxFillPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"]})


def test_a_second_solver_on_the_same_flow_pipeline(sd3_teacher):
    # The first solver installs its own scheduler on the pipe; the second must still see a flow teacher.
    pipe = load_teacher(str(sd3_teacher))
    settings = SolverSettings(steps=2, **SIZE)
    noise = batch_noise(0, [0], (16, 16, 16))
    first = TeacherSolver(pipe, settings).solve(["a red circle"], noise)["latent"]
    second = TeacherSolver(pipe, settings).solve(["a red circle"], noise)["latent"]
    assert torch.equal(first, second)
