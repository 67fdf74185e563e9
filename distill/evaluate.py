"""`distill eval`: how close a student is to its teacher's targets, and how fast, on held-out pairs.

Reports, on pairs the student never trained on (a separate store version or dataset): the
student's mean distance to the teacher's ODE targets (MSE, and LatentLPIPS when weights are given)
next to the teacher's own one-step result from the same noise (DDIM for UNet teachers, flow Euler,
x0 = eps - v(eps, 1), for SD3/FLUX-style flow-matching ones), plus per-image latency of the
student (prompt to latent, text encoding included; and with the VAE decode) against the teacher's
multi-step sampling with guidance. The student samples in `steps` steps (default: the steps it was
trained for, from its d2g_student.json); its between-step noise is a pure function of each pair's
starting noise (distill.generator.noise_keyed_generators), so the report does not depend on batching.
Flow students run with the T5 `max_sequence_length` they were trained with (their d2g_student.json,
else the pairs' fingerprint), and the flow teacher baselines with the pairs' sigma shifting.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from d2g.teacher.loading import load_teacher, t5_dropped
from d2g.teacher.schedulers import FlowShift
from d2g.teacher.solver import SolverSettings, TeacherSolver
from d2g.teacher.vae import decode, to_unit_range
from distill.export import STUDENT_INFO, check_steps, load_student, recommended_steps, student_latents
from distill.flow_student import is_flow_pipeline
from distill.generator import noise_keyed_generators
from store import LATENT, NOISE, PROMPT, PairDataset, PairLoader, console


def _held_out(data_url: str, num: int, batch_size: int):
    dataset = PairDataset(data_url, fields=(NOISE, LATENT, PROMPT), shuffle=False)
    seen = 0
    for batch in PairLoader(dataset, batch_size=batch_size):
        take = min(len(batch[PROMPT]), num - seen)
        yield {k: v[:take] for k, v in batch.items()}, dataset.manifest.fingerprint
        seen += take
        if seen >= num:
            return


def baseline_settings(teacher, solver: dict, steps: int, guidance: float, max_sequence_length: int | None = None,
                      unguided: bool = False, latent_hw: tuple[int, int] | None = None) -> SolverSettings:
    """The teacher baseline's solver: DDIM (eta 0) for a UNet teacher; for a flow-matching one
    (SD3/FLUX) flow Euler with the sigma shifting recorded in the pairs' fingerprint `solver` (at
    one step it evaluates sigma 1 whatever the shift: x0 = eps - v(eps, 1)) and the pairs' T5
    `max_sequence_length`. `unguided`: classifier-free guidance off (SD3, UNet); FLUX's embedded
    guidance is part of its denoiser, so FLUX only drops true CFG. `latent_hw`: the pairs' latent
    height and width (None: the teacher's default resolution)."""
    size = {} if latent_hw is None else {"height": latent_hw[0] * teacher.vae_scale_factor,
                                         "width": latent_hw[1] * teacher.vae_scale_factor}
    if not is_flow_pipeline(teacher):
        return SolverSettings(scheduler="ddim", steps=steps, guidance=1.0 if unguided else guidance,
                              timestep_spacing="trailing", **size)
    from d2g.teacher.flow import FLUX, teacher_kind

    pinned = solver.get("pinned_kwargs") or {}
    flow = FlowShift(shift=pinned.get("shift"), dynamic_shifting=pinned.get("use_dynamic_shifting"),
                     base_shift=pinned.get("base_shift"), max_shift=pinned.get("max_shift"),
                     base_seq_len=pinned.get("base_image_seq_len"), max_seq_len=pinned.get("max_image_seq_len"))
    flux = teacher_kind(teacher) == FLUX
    return SolverSettings(scheduler="flow_euler", steps=steps,
                          guidance=guidance if flux or not unguided else 1.0,
                          true_cfg=1.0 if unguided else float(solver.get("true_cfg") or 1.0),
                          negative_prompt=solver.get("negative_prompt") or "", flow=flow,
                          max_sequence_length=max_sequence_length, **size)


def latency(fn, repeats: int) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - began) / repeats


@torch.no_grad()
def evaluate(model_dir: str, data_url: str, num: int = 64, batch_size: int = 16, teacher_steps: int = 25,
             lpips_weights: str | None = None, latency_repeats: int = 5, steps: int | None = None) -> dict:
    """The report of `distill eval` for the exported student in `model_dir` on up to `num`
    held-out pairs of `data_url` (see the module docstring); `teacher_steps` sets the teacher's
    latency baseline, `lpips_weights` adds LatentLPIPS distances, `latency_repeats` timed calls,
    `steps` the student's sampling steps (default: `recommended_steps`; StudentStepsError above
    the steps it was trained for)."""
    student = load_student(model_dir)
    steps = recommended_steps(model_dir) if steps is None else steps
    check_steps(student, steps)
    info = json.loads((Path(model_dir) / STUDENT_INFO).read_text())
    # A student exported from an SD3 teacher loaded without T5 has none: its teacher runs without it too.
    teacher = load_teacher(info["teacher"], device="cpu", drop_t5=t5_dropped(student))
    lpips = None
    if lpips_weights:
        from distill.losses import make_regression_loss

        lpips = make_regression_loss("latent_lpips", weights=lpips_weights).eval()
    sums = {"student_mse": 0.0, "teacher_1step_mse": 0.0, "teacher_1step_unguided_mse": 0.0,
            "student_latent_lpips": 0.0, "teacher_1step_latent_lpips": 0.0}
    count, guidance, one_step, unguided, msl = 0, None, None, None, None
    flow = is_flow_pipeline(teacher)
    stock_scheduler = teacher.scheduler

    def solver_for(settings: SolverSettings) -> TeacherSolver:
        # A TeacherSolver replaces the pipeline's scheduler with its own, whose config lacks the
        # stock one's _class_name (what tells a flow teacher apart): each starts from the stock one.
        teacher.scheduler = stock_scheduler
        return TeacherSolver(teacher, settings)

    for batch, fingerprint in _held_out(data_url, num, batch_size):
        if one_step is None:  # the teacher's 1-step baseline uses the guidance the pairs were made with
            solver = fingerprint.get("solver", {})
            guidance = solver.get("guidance", 1.0)
            msl = (info.get("max_sequence_length") or solver.get("max_sequence_length")) if flow else None
            hw = tuple(batch[NOISE].shape[-2:])  # the pairs' resolution, whatever the teacher's default
            one_step = solver_for(baseline_settings(teacher, solver, 1, guidance, msl, latent_hw=hw))
            # Guidance extrapolates badly at one step: the unguided one-step teacher is the fairer floor.
            unguided = solver_for(baseline_settings(teacher, solver, 1, guidance, msl, unguided=True, latent_hw=hw))
        target = batch[LATENT].float()
        noise = batch[NOISE].float()
        # Flow students draw between-step noise from torch's global RNG unless given generators.
        keyed = noise_keyed_generators(noise) if flow and steps > 1 else None
        ours = student_latents(student, batch[PROMPT], noise, steps, keyed, max_sequence_length=msl)
        baseline = one_step.solve(batch[PROMPT], batch[NOISE].float())[LATENT].float()
        n = len(target)
        sums["student_mse"] += float(((ours - target) ** 2).mean(dim=(1, 2, 3)).sum())
        sums["teacher_1step_mse"] += float(((baseline - target) ** 2).mean(dim=(1, 2, 3)).sum())
        plain = unguided.solve(batch[PROMPT], batch[NOISE].float())[LATENT].float()
        sums["teacher_1step_unguided_mse"] += float(((plain - target) ** 2).mean(dim=(1, 2, 3)).sum())
        if lpips is not None:
            sums["student_latent_lpips"] += float(lpips(ours, target).sum())
            sums["teacher_1step_latent_lpips"] += float(lpips(baseline, target).sum())
        count += n
    if count == 0:
        raise ValueError(f"no pairs in {data_url}")
    report = {k: v / count for k, v in sums.items() if lpips is not None or "lpips" not in k}
    report.update(num_pairs=count, model=model_dir, data=data_url, guidance=guidance, steps=steps)
    noise1 = batch[NOISE][:1].float()
    prompt1 = batch[PROMPT][:1]
    if msl is not None:
        report["max_sequence_length"] = msl
    teacher_multi = solver_for(baseline_settings(teacher, solver, teacher_steps, guidance, msl, latent_hw=hw))

    def run_student():
        return student_latents(student, prompt1, noise1, steps, max_sequence_length=msl)

    report["latency_student_s"] = latency(run_student, latency_repeats)
    report["latency_student_decoded_s"] = latency(lambda: to_unit_range(decode(student.vae, run_student())),
                                                  latency_repeats)
    report[f"latency_teacher_{teacher_steps}step_s"] = latency(
        lambda: teacher_multi.solve(prompt1, noise1), max(1, latency_repeats // 2))
    report["speedup_vs_teacher"] = report[f"latency_teacher_{teacher_steps}step_s"] / report["latency_student_s"]
    return report


EVAL_EXAMPLES = """examples:
  distill eval --model ./student --data ./demo-out/pairs-heldout --json
  distill eval --model ./student --prompts shapes://train --num 64 --out eval-results
"""


def register(sub) -> None:
    """Add the `eval` subcommand to `sub` (an argparse subparsers object)."""
    import argparse

    from d2g.cli.options import add_model_flags
    from distill.eval_config import EvalConfig

    parser = sub.add_parser(
        "eval", help="FID / CLIP score on prompts (--prompts), or distance to the teacher and latency (--data)",
        description="Two evaluations. With --prompts: generate an image per prompt (fixed seeds, in resumable "
        "shards, on Ray with --workers N) with a student (--model) or a teacher at --steps (--teacher), then FID "
        "against --reference (an image folder or .npz statistics) and CLIP score (--clip-model, a local folder); "
        "on the shapes world the packaged evaluator gives both (its features, its attribute agreement). Writes "
        "OUT/NAME/result.json and a row of OUT/results.md. Every option also comes from --config YAML "
        "(jobs/eval_coco30k_sd15.yaml). With --data: the student's distance to the teacher's ODE targets on "
        "held-out pairs, and latency (--num default 64, --batch-size 16).",
        epilog=EVAL_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with any of the --prompts evaluation's options")
    add_model_flags(parser, EvalConfig)
    parser.add_argument("--data", help="held-out pair store URL[@vN] (not the training pairs): the pair evaluation")
    parser.add_argument("--teacher-steps", type=int, default=25, help="(--data) teacher steps for the latency baseline")
    parser.add_argument("--lpips-weights", help="(--data) LatentLPIPS weights for the perceptual distance (optional)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    console.add_json_flag(parser)
    parser.set_defaults(func=_cmd_eval)


def _cmd_eval(args) -> int:
    if args.data:
        if not args.model:
            from distill.eval_config import EvalConfigError

            raise EvalConfigError("--data needs --model (the exported student to compare with its teacher's targets)")
        report = evaluate(args.model, args.data, args.num or 64, args.batch_size or 16, args.teacher_steps,
                          args.lpips_weights, steps=args.steps)
        if args.json:
            console.print_json(report)
        else:
            for key, value in report.items():
                print(f"{key:32s} {value}")
        return 0
    return _cmd_eval_prompts(args)


def _cmd_eval_prompts(args) -> int:
    import sys

    from d2g.cli.options import flag_overrides
    from distill.eval_config import EvalConfig, load_eval_config
    from distill.eval_run import evaluate_prompts

    config = load_eval_config(args.config, flag_overrides(args, EvalConfig))
    result = evaluate_prompts(config, progress=not args.no_progress)
    if args.json:
        console.print_json(result)
    m = result["metrics"]
    figures = ", ".join(f"{k.upper()} {m[k]:.4g}" for k in ("fid", "clip") if k in m)
    print(f"distill: {result['name']}: {figures} on {result['num']} images ({result['shards']['generated']} shards "
          f"generated, {result['shards']['reused']} reused; {m.get('feature_net', '-')} features, protocol "
          f"{m.get('protocol', '-')}); {result['results_md']}", file=sys.stderr)
    return 0
