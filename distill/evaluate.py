"""`distill eval`: how close a student is to its teacher's targets, and how fast, on held-out pairs.

Reports, on pairs the student never trained on (a separate store version or dataset): the
student's mean distance to the teacher's ODE targets (MSE, and LatentLPIPS when weights are given)
next to the teacher's own one-step DDIM result from the same noise, plus per-image latency of the
student (prompt to latent, text encoding included; and with the VAE decode) against the teacher's
multi-step sampling with guidance. The student samples in `steps` steps (default: the steps it was
trained for, from its d2g_student.json); its between-step noise is a pure function of each pair's
starting noise (distill.export.student_latents), so the report does not depend on batching.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from d2g.teacher.loading import load_teacher
from d2g.teacher.solver import SolverSettings, TeacherSolver
from d2g.teacher.vae import decode, to_unit_range
from distill.export import STUDENT_INFO, check_steps, load_student, recommended_steps, student_latents
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
    teacher = load_teacher(info["teacher"], device="cpu")
    lpips = None
    if lpips_weights:
        from distill.losses import make_regression_loss

        lpips = make_regression_loss("latent_lpips", weights=lpips_weights).eval()
    sums = {"student_mse": 0.0, "teacher_1step_mse": 0.0, "teacher_1step_unguided_mse": 0.0,
            "student_latent_lpips": 0.0, "teacher_1step_latent_lpips": 0.0}
    count, guidance, one_step, unguided = 0, None, None, None
    for batch, fingerprint in _held_out(data_url, num, batch_size):
        if one_step is None:  # the teacher's 1-step baseline uses the guidance the pairs were made with
            guidance = fingerprint.get("solver", {}).get("guidance", 1.0)
            one_step = TeacherSolver(teacher, SolverSettings(scheduler="ddim", steps=1, guidance=guidance,
                                                             timestep_spacing="trailing"))
            # Guidance extrapolates badly at one step: the unguided one-step teacher is the fairer floor.
            unguided = TeacherSolver(teacher, SolverSettings(scheduler="ddim", steps=1, guidance=1.0,
                                                             timestep_spacing="trailing"))
        target = batch[LATENT].float()
        ours = student_latents(student, batch[PROMPT], batch[NOISE].float(), steps)
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
    teacher_multi = TeacherSolver(teacher, SolverSettings(scheduler="ddim", steps=teacher_steps, guidance=guidance))
    report["latency_student_s"] = latency(lambda: student_latents(student, prompt1, noise1, steps), latency_repeats)
    report["latency_student_decoded_s"] = latency(
        lambda: to_unit_range(decode(student.vae, student_latents(student, prompt1, noise1, steps))), latency_repeats)
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
