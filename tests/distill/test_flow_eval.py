"""`distill eval --data` on students of flow-matching transformer teachers (tiny SD3 and FLUX).

The SD3 student is really trained (2 regression steps through `distill train`'s Trainer) and
exported; the FLUX one is a perturbed 2-step export (what is tested is evaluation, not training).
Held-out pairs are written by d2g's own flow solver (pairgen's, flow Euler, 2 steps) at a T5
length other than the pipelines' default, with the fingerprint pairgen records. The reported
distances are checked against numbers computed here independently: the stock pipeline loaded from
the export folder and the stock teacher pipeline, on the noise read back from the store.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from d2g.teacher.loading import load_teacher
from d2g.teacher.solver import SolverSettings, TeacherSolver
from store import LATENT, NOISE, PROMPT, FieldSpec, PairDataset, PairLoader, PairStore, Schema, layout

PROMPTS = ["a red circle", "a blue square", "a green cat", "a red square"]
MSL = 16  # the pairs' T5 max_sequence_length (the pipelines' default is 256 / 512)
SHIFT = {"sd3": 3.0, "flux": None}


def _heldout(teacher, out: str, family: str, guidance: float, n: int = 4) -> str:
    """n pairs of the teacher's 2-step flow-Euler solve (d2g.teacher.solver, as pairgen runs it) in
    one shard, with the solver part of the fingerprint as pairgen writes it."""
    pipe = load_teacher(str(teacher))
    solver = TeacherSolver(pipe, SolverSettings(scheduler="flow_euler", steps=2, guidance=guidance,
                                                max_sequence_length=MSL, height=32, width=32))
    noise = torch.randn(n, 16, 16, 16, generator=torch.Generator().manual_seed(99))  # not the training noise
    prompts = [PROMPTS[(i + 1) % len(PROMPTS)] for i in range(n)]
    latents = solver.solve(prompts, noise)[LATENT]
    st = PairStore(out)
    st.ensure_fingerprint({"teacher": {"name": str(teacher)}, "solver": {
        "scheduler": "flow_euler", "pinned_kwargs": solver.scheduler_kwargs, "steps": 2, "guidance": guidance,
        "true_cfg": 1.0, "negative_prompt": "", "max_sequence_length": MSL}})
    spec = FieldSpec("float32", (16, 16, 16))
    with st.open_shard_writer(layout.shard_name(0), Schema({NOISE: spec, LATENT: spec})) as w:
        for i in range(n):
            w.write(layout.default_key(i), i, prompts[i], i, {NOISE: noise[i].numpy(), LATENT: latents[i].numpy()})
    st.commit([w.info], None)
    return out


def _read_back(url: str) -> dict:
    batch = next(iter(PairLoader(PairDataset(url, fields=(NOISE, LATENT, PROMPT), shuffle=False), batch_size=64)))
    return {NOISE: batch[NOISE].float(), LATENT: batch[LATENT].float(), PROMPT: list(batch[PROMPT])}


def _stock_latents(pipe, prompts, noise, steps, guidance) -> torch.Tensor:
    """The stock pipeline's output latents [B, 16, 16, 16] (FLUX: packed in, unpacked out)."""
    flux = type(pipe).__name__ == "FluxPipeline"
    latents = pipe._pack_latents(noise.clone(), len(noise), 16, 16, 16) if flux else noise.clone()
    out = pipe(prompt=prompts, latents=latents, num_inference_steps=steps, height=32, width=32,
               max_sequence_length=MSL, output_type="latent", guidance_scale=guidance).images
    return pipe._unpack_latents(out, 32, 32, pipe.vae_scale_factor) if flux else out


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.float() - b.float()) ** 2).mean(dim=(1, 2, 3)).mean())


@pytest.fixture(scope="module")
def sd3_export(sd3_teacher, tmp_path_factory):
    """A tiny SD3 student trained 2 regression steps and exported; held-out pairs beside it."""
    from distill.export import export_student
    from distill.train_config import load_train_config
    from distill.trainer import Trainer
    from tests.distill.test_flow_students import _write_pairs

    root = tmp_path_factory.mktemp("flow-eval-sd3")
    train = _write_pairs(sd3_teacher, str(root / "train"), "sd3", n=4)
    config = load_train_config(None, dict(
        data=train, teacher=str(sd3_teacher), out=str(root / "run"), objective="regression",
        objective_config={"regression_loss": "mse"}, max_steps=2, batch_size=2, checkpoint_every=2, log_every=1,
        use_ray=False, lr_g=1e-3, shuffle_block=4, seed=0))
    assert Trainer(config).run(progress=False).steps == 2
    info = export_student(str(root / "run"), str(root / "export"))
    return root / "export", info, _heldout(sd3_teacher, str(root / "heldout"), "sd3", 0.0)


def test_eval_of_a_trained_sd3_student_is_what_the_latents_say(sd3_export, sd3_teacher, capsys):
    """`distill eval --data --json` on the exported SD3 student: finite numbers; the student's MSE
    to the teacher targets equals the stock export pipeline's, the one-step baseline the stock
    teacher's one Euler step (not DDIM, which a flow teacher refuses), at the pairs' T5 length."""
    from diffusers import DiffusionPipeline

    from distill.cli import main

    out, info, heldout = sd3_export
    assert info["max_sequence_length"] == MSL and info["num_inference_steps"] == 1
    assert main(["eval", "--model", str(out), "--data", heldout, "--num", "4", "--batch-size", "2",
                 "--teacher-steps", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    numbers = {k: v for k, v in report.items() if isinstance(v, float)}
    assert {"student_mse", "teacher_1step_mse", "teacher_1step_unguided_mse", "latency_student_s",
            "latency_teacher_2step_s"} <= set(numbers)
    assert all(np.isfinite(v) for v in numbers.values())
    assert (report["num_pairs"], report["steps"], report["max_sequence_length"]) == (4, 1, MSL)

    pairs = _read_back(heldout)
    stock = DiffusionPipeline.from_pretrained(str(out))
    stock.set_progress_bar_config(disable=True)
    with torch.no_grad():
        student = _stock_latents(stock, pairs[PROMPT], pairs[NOISE], 1, 0.0)
        teacher = DiffusionPipeline.from_pretrained(str(sd3_teacher))
        teacher.set_progress_bar_config(disable=True)
        one_step = _stock_latents(teacher, pairs[PROMPT], pairs[NOISE], 1, 0.0)
        two_step = _stock_latents(teacher, pairs[PROMPT], pairs[NOISE], 2, 0.0)
    torch.testing.assert_close(two_step, pairs[LATENT], rtol=1e-4, atol=1e-5)  # the targets are the teacher's
    assert report["student_mse"] == pytest.approx(_mse(student, pairs[LATENT]), rel=1e-4)
    assert report["teacher_1step_mse"] == pytest.approx(_mse(one_step, pairs[LATENT]), rel=1e-4)
    # SD3 without guidance in the pairs: the unguided baseline is the same solve.
    assert report["teacher_1step_unguided_mse"] == pytest.approx(report["teacher_1step_mse"], rel=1e-6)
    # The trained student is not the teacher's one step any more.
    assert report["student_mse"] != pytest.approx(report["teacher_1step_mse"], rel=1e-3)


def test_prompt_eval_images_of_sd3_student_and_teacher(sd3_export, sd3_teacher):
    """`distill eval --prompts` generation: the student's images are the stock export pipeline's
    at the T5 length it was trained with; the teacher's are its stock pipeline's flow-Euler ones."""
    from diffusers import DiffusionPipeline

    from distill.eval_config import EvalConfig
    from distill.eval_run import describe_subject, sample_images
    from distill.export import load_student
    from distill.generator import seeded_noise

    out, _, _ = sd3_export
    noise, _ = seeded_noise(0, [0, 1], (16, 16, 16))
    for config, pipe, steps, msl in (
            (EvalConfig(model=str(out), prompts="shapes://train"), load_student(str(out)), 1, MSL),
            (EvalConfig(teacher=str(sd3_teacher), steps=2, guidance=0.0, prompts="shapes://train"),
             load_teacher(str(sd3_teacher)), 2, None)):
        subject = describe_subject(config)
        ours = sample_images(subject, pipe, PROMPTS[:2], [0, 1], seed=0)
        stock = DiffusionPipeline.from_pretrained(config.model or config.teacher)
        stock.set_progress_bar_config(disable=True)
        with torch.no_grad():
            theirs = stock(prompt=PROMPTS[:2], latents=noise.clone(), num_inference_steps=steps, guidance_scale=0.0,
                           output_type="np", **({"max_sequence_length": msl} if msl else {})).images
        assert ours.shape == (2, 32, 32, 3)
        assert np.abs(ours.astype(int) - np.round(theirs * 255).astype(int)).max() <= 1


def test_eval_of_a_two_step_flux_student(flux_teacher, tmp_path):
    """A 2-step FLUX student (embedded guidance, T5 length from its export) evaluates
    deterministically: the between-step noise is keyed by each pair's starting noise, so batching
    does not change the figures; its distance equals the student's own sampler run here."""
    from d2g.teacher.flow import FLUX
    from distill.evaluate import evaluate
    from distill.export import load_student, student_latents
    from distill.generator import noise_keyed_generators
    from tests.distill.test_flow_students import _export_run

    heldout = _heldout(flux_teacher, str(tmp_path / "heldout"), FLUX, 3.5)
    _, out, export = _export_run(flux_teacher, tmp_path, FLUX, 2, heldout)
    export()
    two = evaluate(str(out), heldout, num=4, batch_size=4, teacher_steps=2, latency_repeats=1)
    again = evaluate(str(out), heldout, num=4, batch_size=2, teacher_steps=2, latency_repeats=1)
    assert two["student_mse"] == pytest.approx(again["student_mse"], rel=1e-5)
    assert all(np.isfinite(v) for v in two.values() if isinstance(v, float))
    pairs = _read_back(heldout)
    ours = student_latents(load_student(str(out)), pairs[PROMPT], pairs[NOISE], 2,
                           noise_keyed_generators(pairs[NOISE]), max_sequence_length=MSL)
    assert two["student_mse"] == pytest.approx(_mse(ours, pairs[LATENT]), rel=1e-4)
    teacher = load_teacher(str(flux_teacher))
    with torch.no_grad():
        one_step = _stock_latents(teacher, pairs[PROMPT], pairs[NOISE], 1, 3.5)
    assert two["teacher_1step_mse"] == pytest.approx(_mse(one_step, pairs[LATENT]), rel=1e-4)


def test_eval_of_a_student_without_t5_runs_its_teacher_without_t5(sd3_export, sd3_teacher, tmp_path):
    """An SD3 student saved without T5 (as exported from a teacher loaded with drop_t5) is compared
    with its teacher loaded the same way: zeros for the T5 tokens in both."""
    import shutil

    from diffusers import DiffusionPipeline

    from distill.evaluate import evaluate
    from distill.export import STUDENT_INFO

    out, _, heldout = sd3_export
    no_t5 = tmp_path / "no-t5"
    load_teacher(str(out), drop_t5=True).save_pretrained(no_t5)
    shutil.copy(out / STUDENT_INFO, no_t5 / STUDENT_INFO)
    report = evaluate(str(no_t5), heldout, num=4, batch_size=4, teacher_steps=1, latency_repeats=1)
    pairs = _read_back(heldout)
    with torch.no_grad():
        teacher = DiffusionPipeline.from_pretrained(str(sd3_teacher), text_encoder_3=None, tokenizer_3=None)
        teacher.set_progress_bar_config(disable=True)
        one_step = _stock_latents(teacher, pairs[PROMPT], pairs[NOISE], 1, 0.0)
        student = DiffusionPipeline.from_pretrained(str(no_t5), text_encoder_3=None, tokenizer_3=None)
        student.set_progress_bar_config(disable=True)
        ours = _stock_latents(student, pairs[PROMPT], pairs[NOISE], 1, 0.0)
    assert report["teacher_1step_mse"] == pytest.approx(_mse(one_step, pairs[LATENT]), rel=1e-4)
    assert report["student_mse"] == pytest.approx(_mse(ours, pairs[LATENT]), rel=1e-4)
