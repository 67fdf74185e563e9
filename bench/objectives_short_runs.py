"""Short training runs of each objective on a tiny offline teacher: held-out distance and s/step.

Usage: OMP_NUM_THREADS=1 python bench/objectives_short_runs.py --arch sd15 --steps 200 \
           --runs regression d2g add add+reg
Builds the tiny teacher (d2g/testing.py), makes 16 training and 8 held-out pairs with the
teacher's 4-step trailing DDIM, trains each objective with AdamW, and prints the held-out MSE of
the one-step student to the teacher's ODE output every `--every` steps, plus seconds per step.
Run one at a time on a shared machine: concurrent torch processes slow each other down ~10x.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.helpers

RUNS = {
    "regression": ("regression", {}),
    "d2g": ("d2g", {"regression_kwargs": {"allow_random": True, "width": 0.125}}),
    "d2g-mse": ("d2g", {"regression_loss": "mse"}),
    "add": ("add", {}),
    "add-adv": ("add", {"lambda_sd": 0.0}),
    "add+reg": ("add", {"regression_weight": 1.0, "lambda_sd": 0.1, "lambda_gan": 0.1}),
}


def main() -> None:
    from d2g.teacher.loading import load_teacher
    from d2g.testing import build_sd15, build_sdxl
    from distill.objective_config import parse_objective_config
    from distill.objectives import make_objective
    from tests.helpers.objectives import make_pairs, mse_to_target, train

    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=["sd15", "sdxl"], default="sd15")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-4, help="generator learning rate")
    parser.add_argument("--lr-d", type=float, default=None, help="discriminator learning rate (default: --lr)")
    parser.add_argument("--runs", nargs="+", default=["regression", "d2g", "add", "add+reg"], choices=sorted(RUNS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = (build_sd15 if args.arch == "sd15" else build_sdxl)(Path(tmp) / args.arch)
        pipe = load_teacher(str(path))
        train_pairs, heldout = make_pairs(pipe, 16, seed=0), make_pairs(pipe, 8, seed=1)
        for run in args.runs:
            name, overrides = RUNS[run]
            torch.manual_seed(0)
            obj = make_objective(name, pipe, parse_objective_config(name, overrides))
            curve = [(0, mse_to_target(obj, heldout))]
            timer = {"train": 0.0, "t0": time.perf_counter()}

            def measure(done, obj=obj, curve=curve, timer=timer):
                if done % args.every == 0 or done == args.steps:
                    timer["train"] += time.perf_counter() - timer["t0"]
                    curve.append((done, mse_to_target(obj, heldout)))
                    timer["t0"] = time.perf_counter()

            train(obj, train_pairs, args.steps, args.lr, args.lr_d or args.lr, callback=measure)
            elapsed = timer["train"]
            points = " ".join(f"{s}:{v:.3f}" for s, v in curve)
            print(f"{args.arch} {run:<10} held-out MSE {points}  train MSE {mse_to_target(obj, train_pairs):.3f}  "
                  f"{elapsed / args.steps:.3f} s/step", flush=True)


if __name__ == "__main__":
    main()
