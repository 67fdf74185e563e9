"""The embedded demo, end to end: pairs from the built-in teacher with Ray, a verified store, a
one-step student trained from the streamed shards, exported to diffusers, evaluated, and a report.

    python -m d2g.demo [--out demo-out] [--teacher shapes] [--num-pairs 2048] [--train-steps 400]

Re-running reuses what is there: pairgen skips finished shards, the trainer resumes from its
latest checkpoint (and does nothing once it has reached --train-steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from store import LATENT


def _stage(title: str) -> float:
    print(f"\n== {title}", file=sys.stderr, flush=True)
    return time.perf_counter()


def _done(began: float, what: str) -> None:
    print(f"   {what} ({time.perf_counter() - began:.1f} s)", file=sys.stderr, flush=True)


def generate_pairs(args, out: str, prompts: str, num_pairs: int, seed: int):
    """Run pairgen: `num_pairs` pairs of `prompts` with dataset seed `seed` into `out`, teacher and
    batching from `args`. Finished shards are reused. Returns the RunSummary."""
    from pairgen.config import load_config
    from pairgen.runner import PairgenRun

    config = load_config(None, dict(teacher=args.teacher, prompts=prompts, out=out, num_pairs=num_pairs,
                                    shard_size=args.shard_size, steps=args.teacher_steps, guidance=args.guidance,
                                    batch_size=args.batch_size, workers=args.workers, seed=seed,
                                    commit_every=0))
    return PairgenRun(config, progress=True).run()


def verify(url: str) -> dict:
    """Verify every shard of the latest version at `url`; exits the demo on a problem, else returns
    the version and its shard and pair counts."""
    from store import PairStore
    from store.verify import verify_version

    st = PairStore(url)
    manifest = st.manifest()
    problems = verify_version(st, manifest)
    if problems:
        raise SystemExit(f"demo: store verify failed for {url}: {problems}")
    return {"version": manifest.version, "num_shards": len(manifest.shards), "num_pairs": manifest.num_pairs}


def train_student(args, pairs: str, run: str) -> dict:
    """Train the d2g objective from the pairs at `pairs` into the run folder `run`, in this process
    (resuming from its latest checkpoint); returns the training summary."""
    from distill.ray_launch import train
    from distill.train_config import load_train_config

    objective = {"regression_loss": args.regression_loss, "lambda_gan": args.lambda_gan}
    if args.regression_loss in ("e_latent_lpips", "latent_lpips"):
        objective["regression_kwargs"] = _lpips_kwargs(args)
    config = load_train_config(None, dict(
        data=pairs, teacher=args.teacher, out=run, objective="d2g", objective_config=objective,
        max_steps=args.train_steps, batch_size=args.train_batch, lr_g=args.lr, lr_d=args.lr,
        checkpoint_every=max(1, args.train_steps // 4), log_every=10, use_ray=False, threads=0,
        ema_decay=0.99, seed=0))
    return train(config)


def _lpips_kwargs(args) -> dict:
    from distill.losses import latent_lpips_options

    # The packaged LatentLPIPS for the shapes VAE; other teachers' latent spaces have none here.
    return latent_lpips_options("shapes" if args.teacher == "shapes" else "random")


@torch.no_grad()
def comparison_grid(args, model_dir: str, report_dir: Path, count: int = 8) -> dict:
    """Rows: teacher at --teacher-steps, teacher at 1 step, student at 1 step; same prompts and noises."""
    from d2g.teacher.loading import load_teacher
    from d2g.teacher.noise import batch_noise
    from d2g.teacher.solver import SolverSettings, TeacherSolver
    from d2g.teacher.vae import decode, latent_shape, to_unit_range
    from distill.export import load_student, student_latents
    from distill.preview import grid_png
    from pairgen.prompts import load_prompts

    prompts = load_prompts(args.heldout_prompts).prompts_for(0, count)
    teacher = load_teacher(args.teacher)
    student = load_student(model_dir)
    shape = latent_shape(student)
    noise = batch_noise(args.eval_seed, list(range(count)), shape)
    rows = {}
    for name, steps in ((f"teacher_{args.teacher_steps}step", args.teacher_steps), ("teacher_1step", 1)):
        solver = TeacherSolver(teacher, SolverSettings(steps=steps, guidance=args.guidance))
        rows[name] = to_unit_range(decode(teacher.vae, solver.solve(prompts, noise)[LATENT]))
    rows["student_1step"] = to_unit_range(decode(student.vae, student_latents(student, prompts, noise)))
    images = torch.cat(list(rows.values()))
    (report_dir / "grid.png").write_bytes(grid_png(images, columns=count))
    return {"rows": list(rows), "prompts": prompts}


def shapes_quality(args, model_dir: str, out: Path, num: int = 256) -> dict:
    """With the shapes teacher: the student beside the teacher at --teacher-steps and at one step
    (guided and unguided) on `num` shapes prompts, through `distill eval --prompts` (the COCO
    evaluation's code path) with the packaged evaluator as the feature network: its Fréchet
    distance to real renderings (the FID analogue) and its attribute agreement (the CLIP-score
    analogue, % of images with every attribute right). Images and results.md go to `out`."""
    from distill.eval_config import EvalConfig
    from distill.eval_run import evaluate_prompts
    from distill.quality import NOISE_SEED

    # distill.quality's prompts and noise seed, so the accuracies are those it reported before.
    common = dict(prompts="shapes://train", num=num, seed=NOISE_SEED, metrics="fid,clip", out=str(out),
                  batch_size=64)
    runs = {f"teacher_{args.teacher_steps}step": dict(teacher="shapes", steps=args.teacher_steps, guidance=args.guidance),
            "teacher_1step": dict(teacher="shapes", steps=1, guidance=args.guidance),
            "teacher_1step_unguided": dict(teacher="shapes", steps=1, guidance=1.0),
            "student_1step": dict(model=model_dir, steps=1)}
    rows = {}
    for name, subject in runs.items():
        result = evaluate_prompts(EvalConfig(**common, **subject, name=name), progress=False)
        rows[name] = {"accuracy": result["metrics"]["clip"] / 100, "fid": result["metrics"]["fid"]}
    return rows


def _export_once(run: str, model: str, export_student) -> None:
    """Export the run's latest step into the demo's own model folder, replacing an older export of
    the demo (a re-run that trained further), keeping one of the same step."""
    import shutil

    from distill.checkpoint import CheckpointStore

    info_file = Path(model) / "d2g_student.json"
    if info_file.exists():
        if json.loads(info_file.read_text())["step"] == CheckpointStore(run).latest():
            return
        shutil.rmtree(model)
    export_student(run, model)


def write_report(report_dir: Path, sections: dict) -> Path:
    """Write REPORT.md (evaluation, evaluator quality, grid, stage summaries) into `report_dir`;
    returns its path."""
    lines = ["# d2g demo report", "", f"Teacher: `{sections['teacher']}`. Generated {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", ""]
    lines += ["## Held-out evaluation (`distill eval`)", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.5g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sections["eval"].items()]
    if sections.get("quality"):
        num = sections.get("quality_prompts", 256)
        lines += ["", f"## Judged by the shapes evaluator (`distill eval --prompts shapes://train`, {num} prompts)", "",
                  "The COCO evaluation's code path with the packaged evaluator as the feature network: FID is its "
                  "Fréchet distance to as many real renderings (mostly sample-size bias at a few hundred images: "
                  "compare rows, not with the papers); the CLIP-score analogue is its attribute agreement. "
                  "Images and `results.md` in `eval/student-step-N/`.", "",
                  "| sampler | every attribute right (CLIP analogue) | FID (shapes features) |", "|---|---|---|"]
        lines += [f"| {name} | {100 * q['accuracy']:.1f}% | {q['fid']:.4g} |" for name, q in sections["quality"].items()]
    lines += ["", "## Grid", "", "Rows, top to bottom: " + ", ".join(sections["grid"]["rows"]) +
              "; columns: the same prompt and noise.", "", "![grid](grid.png)", ""]
    lines += ["Prompts: " + "; ".join(f"`{p}`" for p in sections["grid"]["prompts"]), ""]
    lines += ["## Stages", "", "```json", json.dumps(sections["stages"], indent=2, default=str), "```", ""]
    path = report_dir / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    """`python -m d2g.demo`: the six stages in order; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo-out", help="folder for pairs, the run, the export and the report")
    parser.add_argument("--teacher", default="shapes", help="teacher (default: the embedded shapes teacher)")
    parser.add_argument("--prompts", default="shapes://train", help="training prompt source")
    parser.add_argument("--heldout-prompts", default="shapes://train",
                        help="prompts for the held-out pairs (new noises; shapes://heldout for unseen combinations)")
    parser.add_argument("--num-pairs", type=int, default=2048)
    parser.add_argument("--eval-pairs", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--teacher-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=64, help="pairgen batch size")
    parser.add_argument("--workers", type=int, default=2, help="pairgen Ray actors")
    parser.add_argument("--train-steps", type=int, default=400)
    parser.add_argument("--train-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lambda-gan", type=float, default=0.1)
    parser.add_argument("--regression-loss", default="e_latent_lpips")
    parser.add_argument("--eval-seed", type=int, default=10_000, help="dataset seed of the held-out pairs")
    parser.add_argument("--quality-prompts", type=int, default=256,
                        help="prompts the shapes evaluator judges for the report (shapes teacher only)")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show what the libraries say (loading bars, deprecations), as the CLIs' -v does")
    args = parser.parse_args(argv)
    from d2g.cli.quiet import setup_cli_output

    setup_cli_output(args.verbose)  # the same quiet output as pairgen and distill, in every stage

    out = Path(args.out)
    report_dir = out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    pairs, heldout, run, model = (str(out / "pairs"), str(out / "pairs-heldout"), str(out / "run"),
                                  str(out / "student"))
    stages: dict = {}
    began = _stage(f"1/6 pairgen: {args.num_pairs} pairs from teacher {args.teacher!r} on a local Ray")
    stages["pairgen"] = generate_pairs(args, pairs, args.prompts, args.num_pairs, seed=0).as_dict()
    _done(began, f"{stages['pairgen']['pairs_generated']} generated, {stages['pairgen']['shards_reused']} shards reused")
    began = _stage(f"2/6 pairgen: {args.eval_pairs} held-out pairs (new noises)")
    stages["pairgen_heldout"] = generate_pairs(args, heldout, args.heldout_prompts, args.eval_pairs,
                                               seed=args.eval_seed).as_dict()
    _done(began, "held-out pairs ready")
    began = _stage("3/6 store verify")
    stages["verify"] = verify(pairs)
    _done(began, f"{stages['verify']['num_shards']} shards verified")
    began = _stage(f"4/6 distill train: objective d2g, {args.train_steps} steps, streaming from {pairs}")
    stages["train"] = train_student(args, pairs, run)
    _done(began, f"trained to step {stages['train']['steps']}")
    began = _stage("5/6 distill export + eval")
    from distill.evaluate import evaluate
    from distill.export import export_student

    _export_once(run, model, export_student)
    evaluation = evaluate(model, heldout, num=args.eval_pairs, teacher_steps=args.teacher_steps)
    _done(began, f"student MSE to teacher targets {evaluation['student_mse']:.4f} vs teacher 1-step "
          f"{evaluation['teacher_1step_mse']:.4f}; {evaluation['speedup_vs_teacher']:.1f}x faster")
    began = _stage("6/6 report")
    grid = comparison_grid(args, model, report_dir)
    # One eval folder per exported step: a re-run that trained further scores the new student afresh.
    student_step = json.loads((Path(model) / "d2g_student.json").read_text())["step"]
    quality = (shapes_quality(args, model, report_dir / "eval" / f"student-step-{student_step}", args.quality_prompts)
               if args.teacher == "shapes" else None)
    if quality:
        print("   every attribute right: " + ", ".join(f"{k} {100 * v['accuracy']:.1f}%" for k, v in quality.items()),
              file=sys.stderr, flush=True)
        print("   shapes FID: " + ", ".join(f"{k} {v['fid']:.4g}" for k, v in quality.items()), file=sys.stderr, flush=True)
    path = write_report(report_dir, {"teacher": args.teacher, "eval": evaluation, "grid": grid, "stages": stages,
                                     "quality": quality, "quality_prompts": args.quality_prompts})
    _done(began, f"wrote {path} and {report_dir / 'grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
