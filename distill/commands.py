"""`distill train | export | generate`: the trainer's command line."""

from __future__ import annotations

import argparse
import sys

from d2g.cli.json_stdout import stdout_kept_for_json
from d2g.cli.options import add_model_flags, flag_overrides
from distill.train_config import TrainConfig, load_train_config
from store import console

TRAIN_EXAMPLES = """examples:
  distill train --data ./demo-out/pairs --teacher shapes --out ./runs/d2g --objective d2g --max-steps 400 --no-ray
  distill train --data ./demo-out/pairs --teacher shapes --out ./runs/d2g-gan --objective d2g --max-steps 2 --no-ray --objective-config '{lambda_gan: 0.1}'
"""
EXPORT_EXAMPLES = """examples:
  distill export ./runs/d2g --out ./student-from-help
"""
GENERATE_EXAMPLES = """examples:
  distill generate ./student --prompt "a small red circle in the top left on a black background" --num 2 --out pngs
  distill generate ./student --prompt "a large blue square in the center on a white background" --steps 1 --out pngs
"""


def _cmd_train(args) -> int:
    from distill.ray_launch import train

    overrides = flag_overrides(args, TrainConfig)
    if args.no_ray:
        overrides["use_ray"] = False
    config = load_train_config(args.config, overrides)
    with stdout_kept_for_json(args.json):
        summary = train(config, progress=not args.no_progress)
    if args.json:
        console.print_json(summary)
    print(f"distill: {summary['steps']} steps in {summary['seconds']:.1f} s "
          f"({summary['steps_per_second']:.2f} steps/s), resumed from {summary['resumed_from']}; "
          f"data v{summary['data_version']}; checkpoints in {summary['out']}/checkpoints", file=sys.stderr)
    return 0


def _cmd_export(args) -> int:
    from distill.export import export_student

    info = export_student(args.run, args.out, step=args.step, use_ema=not args.no_ema)
    if args.json:
        console.print_json(info)
    skipped = f" (skipped incomplete step {info['skipped_incomplete_step']})" if info.get("skipped_incomplete_step") else ""
    print(f"distill: exported step {info['step']} ({info['weights']} weights) of {info['run']}{skipped} "
          f"as a diffusers pipeline to {info['out']}", file=sys.stderr)
    return 0


def _cmd_generate(args) -> int:
    from distill.export import generate_pngs

    paths = generate_pngs(args.model, args.prompt, args.num, args.seed, args.out, steps=args.steps)
    if args.grid:
        from distill.preview import write_contact_sheet

        write_contact_sheet(paths, args.grid, columns=args.grid_columns)
    if args.json:
        console.print_json({"images": paths})
    else:
        print("\n".join(paths))
    return 0


def register(sub) -> None:
    """Add the `train`, `export` and `generate` subcommands to `sub` (an argparse subparsers object)."""
    train = sub.add_parser("train", help="train a one-step student from a pair store",
                           description="Stream pairs from a store (local or s3://) and train a one-step student "
                           "with the chosen objective, on Ray Train (DDP, or FSDP with --fsdp) or in-process (--no-ray). Checkpoints go "
                           "to --out; re-running resumes from the latest complete one. Less memory: LoRA students "
                           "and d2g discriminators on one shared frozen teacher UNet (--generator-lora-rank, "
                           "--discriminator-lora-rank) and --grad-checkpointing.",
                           epilog=TRAIN_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--config", help="YAML file with any of the options below")
    add_model_flags(train, TrainConfig)
    train.add_argument("--no-ray", action="store_true", help="train in this process (debugging; same as --no-use-ray)")
    console.add_json_flag(train)
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    export = sub.add_parser("export", help="export a run's student as a diffusers pipeline folder",
                            description="Write a run's student as a stock diffusers pipeline folder with a model "
                            "card: the teacher's pipeline with the student's UNet and a scheduler (LCMScheduler) that "
                            "runs the student's own 1- to 4-step sampler; the card records its num_inference_steps. A LoRA "
                            "student (--generator-lora-rank) is merged into that UNet and also written as a diffusers "
                            "LoRA in OUT/lora, for the stock teacher pipeline's load_lora_weights.",
                            epilog=EXPORT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("run", help="run folder URL (the --out of distill train)")
    export.add_argument("--out", required=True, help="folder URL to write the pipeline to (local or s3://...); "
                        "must not exist or be empty")
    export.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    export.add_argument("--no-ema", action="store_true", help="export the raw generator instead of its EMA")
    console.add_json_flag(export)
    export.set_defaults(func=_cmd_export)

    gen = sub.add_parser("generate", help="generate PNGs with an exported student",
                         description="Generate PNGs with an exported student, in the steps it was trained for "
                         "(--steps: fewer). Existing files are never overwritten (numbering continues); each PNG "
                         "records its prompt, seed, noise index, steps and model.",
                         epilog=GENERATE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("model", help="exported pipeline folder")
    gen.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    gen.add_argument("--num", type=int, default=1, help="images per prompt")
    gen.add_argument("--seed", type=int, default=0, help="noise seed (noise i = f(seed, i), as in pairgen)")
    gen.add_argument("--out", default="generated", help="output folder URL (local or s3://...)")
    gen.add_argument("--steps", type=int, help="sampling steps (default: the model's recommended steps from "
                     "d2g_student.json; 1 for older exports); at most the steps it was trained for")
    gen.add_argument("--grid", help="also write the images of this call as one grid PNG here, row by row in "
                     "file order (the previews to pick from for distill upscale)")
    gen.add_argument("--grid-columns", type=int, default=8, help="images per grid row")
    console.add_json_flag(gen)
    gen.set_defaults(func=_cmd_generate)

