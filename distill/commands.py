"""`distill train | export | generate`: the trainer's command line."""

from __future__ import annotations

import json
import sys

from d2g.cli.options import add_model_flags, flag_overrides
from distill.train_config import TrainConfig, load_train_config


def _cmd_train(args) -> int:
    from distill.ray_launch import train

    overrides = flag_overrides(args, TrainConfig)
    if args.no_ray:
        overrides["use_ray"] = False
    config = load_train_config(args.config, overrides)
    summary = train(config, progress=not args.no_progress)
    if args.json:
        print(json.dumps(summary, indent=2))
    print(f"distill: {summary['steps']} steps in {summary['seconds']:.1f} s "
          f"({summary['steps_per_second']:.2f} steps/s), resumed from {summary['resumed_from']}; "
          f"data v{summary['data_version']}; checkpoints in {config.out}/checkpoints", file=sys.stderr)
    return 0


def _cmd_export(args) -> int:
    from distill.export import export_student

    out = export_student(args.run, args.out, step=args.step, use_ema=not args.no_ema)
    print(json.dumps({"exported": str(out)}) if args.json else f"distill: exported a diffusers pipeline to {out}")
    return 0


def _cmd_generate(args) -> int:
    import torch

    from d2g.teacher.noise import sample_noise
    from d2g.teacher.vae import decode, latent_shape, to_unit_range
    from distill.export import load_student, save_pngs, student_latents

    pipe = load_student(args.model)
    prompts = args.prompt * args.num
    shape = latent_shape(pipe)
    noise = torch.stack([sample_noise(args.seed, i, shape) for i in range(len(prompts))])
    with torch.no_grad():
        images = to_unit_range(decode(pipe.vae, student_latents(pipe, prompts, noise)))
    paths = save_pngs(images, args.out)
    print(json.dumps({"images": paths}) if args.json else "\n".join(paths))
    return 0


def register(sub) -> None:
    """Add the `train`, `export` and `generate` subcommands to `sub` (an argparse subparsers object)."""
    train = sub.add_parser("train", help="train a one-step student from a pair store",
                           description="Stream pairs from a store (local or s3://) and train a one-step student "
                           "with the chosen objective, on Ray Train (DDP) or in-process (--no-ray). Checkpoints go "
                           "to --out; re-running resumes from the latest complete one.",
                           epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", help="YAML file with any of the options below")
    add_model_flags(train, TrainConfig)
    train.add_argument("--no-ray", action="store_true", help="train in this process (debugging; same as --no-use-ray)")
    train.add_argument("--json", action="store_true", help="print the final summary as JSON")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    export = sub.add_parser("export", help="export a run's student as a diffusers pipeline folder")
    export.add_argument("run", help="run folder URL (the --out of distill train)")
    export.add_argument("--out", required=True, help="folder to write the pipeline to")
    export.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    export.add_argument("--no-ema", action="store_true", help="export the raw generator instead of its EMA")
    export.add_argument("--json", action="store_true")
    export.set_defaults(func=_cmd_export)

    gen = sub.add_parser("generate", help="generate PNGs with an exported student in one step")
    gen.add_argument("model", help="exported pipeline folder")
    gen.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    gen.add_argument("--num", type=int, default=1, help="images per prompt")
    gen.add_argument("--seed", type=int, default=0, help="noise seed (noise i = f(seed, i), as in pairgen)")
    gen.add_argument("--out", default="generated", help="output folder")
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=_cmd_generate)

