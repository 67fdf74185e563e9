"""Peak memory and time of one d2g training step: full fine-tuning against LoRA students and
discriminators on a shared frozen base, each without and with gradient checkpointing.

    .venv/bin/python bench/memory_bench.py [--unet-channels 64 128 256 256] [--latent-size 32] [--batch 2]
                                           [--lora-rank 16] [--repeats 2] [--threads 2]

Model: an SD1.5-architecture UNet (SD1.5's block types and 2 layers per block, cross-attention
transformer blocks, 8-channel attention heads) at reduced width (--unet-channels; SD1.5 is
320 640 1280 1280), with a small VAE and CLIP text encoder (they take no part in a training step).
Random weights: cost does not depend on their values.
One step = the discriminator step (student under no_grad, D on real and fake) and the generator
step (student, E-LatentLPIPS regression, D's GAN term), each with backward and an AdamW update of
its trainable parameters, as distill's trainer does (no lazy R1 in the measured steps).
Cases (each in a fresh process):
  full           the student and the discriminator are full trainable copies of the teacher UNet
  lora-g         the student is a LoRA adapter on the teacher's UNet, the discriminator a full copy
  lora-shared    student and discriminator are adapters on the one frozen base the teacher is
and each again with --grad-checkpointing both (`+ckpt`).
Memory, from /proc/self/status of the case's process (after a warm-up step, which allocates the
optimiser states, and the timed steps):
  process peak   VmHWM over the whole process, loading included;
  step peak      the peak RSS during the timed steps (the high-water mark reset after the warm-up,
                 `echo 5 > /proc/self/clear_refs`): everything resident while training (teacher,
                 trainable weights, gradients, optimiser states) plus the step's activations;
both also "above imports": minus the RSS of the same process after its imports, before the
teacher is loaded. The goal (issue #20) compares the step peak above imports: lora-shared <= 40%
of full. At small latent sizes weights dominate and checkpointing saves little.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import TINY_VAE, build_sd15_pipeline, reset_peak, run_worker, status_kb  # noqa: E402

CASES = ("full", "lora-g", "lora-shared")
GOAL = 0.40


def worker(teacher: str, case: str, checkpointing: bool, batch: int, size: int, rank: int, repeats: int,
           threads: int) -> dict:
    """One case in this (fresh) process: build, one warm-up step, `repeats` timed steps."""
    import warnings

    import torch

    from d2g.teacher.loading import load_teacher
    from distill.objective_config import D2GConfig, LoRASettings, MemoryOptions
    from distill.objectives import make_objective

    torch.set_num_threads(threads)
    imports_kb = status_kb("VmRSS")
    pipe = load_teacher(teacher)
    lora = LoRASettings(rank, float(rank))
    memory = MemoryOptions(generator_lora=lora if case != "full" else None,
                           discriminator_lora=lora if case == "lora-shared" else None,
                           checkpoint_generator=checkpointing, checkpoint_discriminator=checkpointing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # E-LatentLPIPS with random weights: expected here
        config = D2GConfig(regression_loss="e_latent_lpips", regression_kwargs={"allow_random": True},
                           lambda_gan=0.1, r1_every=10**6)
        objective = make_objective("d2g", pipe, config, memory=memory)
    trainable = {name: [p for p in module.parameters() if p.requires_grad]
                 for name, module in (("g", objective.generator), ("d", objective.discriminator))}
    g_opt, d_opt = (torch.optim.AdamW(trainable[k], lr=1e-5) for k in ("g", "d"))
    gen = torch.Generator().manual_seed(0)
    data = {"noise": torch.randn(batch, 4, size, size, generator=gen),
            "latent": torch.randn(batch, 4, size, size, generator=gen), "prompt": ["a red circle"] * batch}

    def step() -> float:
        began = time.perf_counter()
        for optimizer, loss_fn in ((d_opt, objective.discriminator_loss), (g_opt, objective.generator_loss)):
            optimizer.zero_grad(set_to_none=True)
            value, _ = loss_fn(data, 1)
            value.backward()
            optimizer.step()
        return time.perf_counter() - began

    step()  # warm-up: optimiser states, allocator
    process_peak_kb = status_kb("VmHWM")
    exact = reset_peak()
    times = [step() for _ in range(repeats)]
    step_peak_kb = status_kb("VmHWM")
    process_peak_kb = max(process_peak_kb, step_peak_kb)
    return {"case": case + ("+ckpt" if checkpointing else ""), "seconds": statistics.median(times),
            "peak_mb": process_peak_kb / 1024, "above_imports_mb": (process_peak_kb - imports_kb) / 1024,
            "step_peak_above_imports_mb": (step_peak_kb - imports_kb) / 1024, "exact_step_peak": exact,
            "trainable_g": sum(p.numel() for p in trainable["g"]), "trainable_d": sum(p.numel() for p in trainable["d"]),
            "unet_params": sum(p.numel() for n, p in pipe.unet.named_parameters() if ".lora_" not in n)}


def main(argv: list[str] | None = None) -> int:
    """Run every case in a fresh process and print the table, the ratios to full fine-tuning and the goal."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--unet-channels", type=int, nargs="+", default=[64, 128, 256, 256])
    parser.add_argument("--latent-size", type=int, default=32, help="latent height and width (SD1.5 at 512 px: 64)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lora-rank", type=int, default=16, help="rank (and alpha) of both adapters")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per case (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "CKPT"), help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        case, ckpt = args.worker
        print(json.dumps(worker(args.teacher, case, ckpt == "1", args.batch, args.latent_size, args.lora_rank,
                                args.repeats, args.threads)))
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="d2g-memory-bench-") as tmp:
        teacher = str(build_sd15_pipeline(Path(tmp) / "teacher", args.unet_channels, layers_per_block=2, vae=TINY_VAE))
        for ckpt in ("0", "1"):
            for case in CASES:
                extra = ["--teacher", teacher, "--batch", str(args.batch), "--latent-size", str(args.latent_size),
                         "--lora-rank", str(args.lora_rank), "--repeats", str(args.repeats), "--threads",
                         str(args.threads)]
                row = run_worker(__file__, [case, ckpt, *extra], args.threads)
                rows.append(row)
                print(f"  measured {row['case']}: step peak {row['step_peak_above_imports_mb']:.0f} MB, process peak "
                      f"{row['above_imports_mb']:.0f} MB above imports, {row['seconds']:.2f} s/step",
                      file=sys.stderr, flush=True)
    full = {r["case"].endswith("+ckpt"): r for r in rows if r["case"].split("+")[0] == "full"}[False]
    print(f"d2g training step: SD1.5-architecture UNet at block_out_channels {args.unet_channels}, 2 layers per "
          f"block ({rows[0]['unet_params'] / 1e6:.1f} M parameters), latents {args.latent_size}x{args.latent_size}, "
          f"batch {args.batch}, E-LatentLPIPS (random weights), LoRA rank {args.lora_rank} on to_q/to_k/to_v/to_out.0, "
          f"{args.threads} threads, median of {args.repeats} steps")
    key = "step_peak_above_imports_mb"
    print("MB above imports (the process after its imports, before loading the teacher); ratios to full")
    print(f"{'case':<18}{'step peak':>10}{'vs full':>9}{'process peak':>14}{'vs full':>9}{'s/step':>8}{'vs full':>9}"
          f"{'trainable G':>13}{'trainable D':>13}")
    for r in rows:
        print(f"{r['case']:<18}{r[key]:>10.0f}{r[key] / full[key]:>9.2f}{r['above_imports_mb']:>14.0f}"
              f"{r['above_imports_mb'] / full['above_imports_mb']:>9.2f}{r['seconds']:>8.2f}"
              f"{r['seconds'] / full['seconds']:>9.2f}{r['trainable_g']:>13,}{r['trainable_d']:>13,}")
    if not all(r["exact_step_peak"] for r in rows):
        print("note: /proc/self/clear_refs unavailable: step peaks include loading (upper bounds)")
    for r in rows:
        if r["case"].startswith("lora-shared"):
            ratio = r[key] / full[key]
            print(f"goal: {r['case']} step peak <= {GOAL:.0%} of full fine-tuning's: {ratio:.0%} "
                  f"({'met' if ratio <= GOAL else 'NOT met'})")
    if args.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
