"""`distill lpips train-trunk` and `distill lpips calibrate`: train E-LatentLPIPS for a new latent space."""

from __future__ import annotations

import argparse
import sys


def _add_common(parser: argparse.ArgumentParser, steps: int, batch_size: int, lr: float) -> None:
    parser.add_argument("--out", required=True, help="run directory: checkpoint.pt and the exported weights")
    parser.add_argument(
        "--steps", type=int, default=steps, help="total optimisation steps (default %(default)s)"
    )
    parser.add_argument("--batch-size", type=int, default=batch_size, help="default %(default)s")
    parser.add_argument("--lr", type=float, default=lr, help="learning rate (default %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="fixes batch order and dropout per step (default 0)"
    )
    parser.add_argument(
        "--checkpoint-every", type=int, default=100, help="steps between checkpoints (default %(default)s)"
    )
    parser.add_argument(
        "--log-every", type=int, default=10, help="steps between JSON log lines (default %(default)s)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt (starts fresh if there is none)",
    )


def _run_train_trunk(args: argparse.Namespace) -> int:
    from .train_trunk import TrunkTrainConfig, train_trunk

    cfg = TrunkTrainConfig(
        data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        momentum=args.momentum, weight_decay=args.weight_decay, width=args.width,
        pools_removed=args.pools_removed, seed=args.seed,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, resume=args.resume,
    )  # fmt: skip
    return _report(lambda: train_trunk(cfg))


def _run_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import CalibrateConfig, calibrate

    cfg = CalibrateConfig(
        data=args.data, trunk=args.trunk, out=args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, checkpoint_every=args.checkpoint_every, log_every=args.log_every, resume=args.resume,
    )  # fmt: skip
    return _report(lambda: calibrate(cfg))


def _report(run) -> int:
    # Bad input becomes one readable line and exit code 2, not a traceback.
    try:
        path = run()
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def register(subparsers) -> None:
    """Add `lpips train-trunk` and `lpips calibrate` to the `distill` command.

    Args:
        subparsers: the `distill` parser's subparsers object.
    """
    lpips = subparsers.add_parser("lpips", help="train E-LatentLPIPS (trunk, then heads) for a latent space")
    sub = lpips.add_subparsers(dest="lpips_command", metavar="LPIPS_COMMAND")
    lpips.set_defaults(func=lambda args: (lpips.print_help(), 2)[1])

    trunk = sub.add_parser(
        "train-trunk",
        help="train the latent VGG16-BN trunk as a latent classifier",
        description="Train the latent VGG16-BN trunk as a classifier over DATA/<class>/*.npy|*.safetensors "
        "(one latent [C,H,W] each; safetensors key 'latent'). Writes OUT/checkpoint.pt every "
        "--checkpoint-every steps and OUT/trunk.safetensors at the end.",
    )
    trunk.add_argument("--data", required=True, help="folder of class sub-folders of latents")
    _add_common(trunk, steps=1000, batch_size=64, lr=0.01)
    trunk.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default %(default)s)")
    trunk.add_argument("--weight-decay", type=float, default=1e-4, help="default %(default)s")
    trunk.add_argument(
        "--width", type=float, default=1.0, help="channel multiplier; 1.0 is the official architecture"
    )
    trunk.add_argument(
        "--pools-removed", type=int, default=3, choices=range(4), metavar="{0,1,2,3}",
        help="first max-pools replaced by identities: 3 for latents (published, default); 0 for a pixel "
        "trunk trained on images (DATA holding [3,H,W] images in [-1,1], H,W >= 32)",
    )  # fmt: skip
    trunk.set_defaults(func=_run_train_trunk)

    cal = sub.add_parser(
        "calibrate",
        help="calibrate the linear heads on 2AFC latent triplets",
        description="Train the five non-negative 1x1 heads on BAPPS-style 2AFC triplets encoded to latents: "
        "DATA/*.safetensors with 'ref', 'p0', 'p1' [N,C,H,W] and 'judge' [N] in [0,1] (fraction "
        "preferring p1). The trunk is frozen. Writes OUT/checkpoint.pt and OUT/lpips.safetensors.",
    )
    cal.add_argument("--data", required=True, help="folder of triplet shards")
    cal.add_argument(
        "--trunk", required=True,
        help="trunk weights: our trunk.safetensors, our lpips.safetensors, or an official *_latent_vgg16.pth.tar",
    )  # fmt: skip
    _add_common(cal, steps=1000, batch_size=50, lr=1e-4)
    cal.set_defaults(func=_run_calibrate)
