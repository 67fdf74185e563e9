"""Training-step cost of the `d2g` objective, E-LatentLPIPS against pixel LPIPS, and one-step
generation latency against the teacher's 25-step sampling with guidance, measured in one run.

    .venv/bin/python bench/distill_bench.py [--threads 2] [--repeats 3] [--unet-channels 64 128 256 256]

Model: an SD1.5-architecture pipeline at SD1.5's latent size (64x64x4 latents, 512x512 images):
the UNet at reduced width (--unet-channels; SD1.5 is 320 640 1280 1280), SD1.5's VAE architecture,
a small CLIP text encoder. Random weights: cost does not depend on their values.
(a) one d2g training step (D step + G step, batch --batch) with E-LatentLPIPS as the regression loss;
(b) the same step with pixel LPIPS (VAE decode to 512x512 + VGG16 LPIPS) in its place.
(c) generation per image: the one-step student (text encoding + 1 UNet call) against the teacher's
    25 DDIM steps with CFG (text encoding + 50 UNet evaluations), each without and with the VAE decode.
Each case runs in a fresh process; "extra" memory = peak RSS during the measured iterations minus RSS
before them. Goals: (a) <= 1/3 of (b)'s step time; student >= 40x faster than the teacher.
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
from measure import build_sd15_pipeline, reset_peak, run_worker, status_kb  # noqa: E402


def _train_step_worker(teacher: str, loss: str, batch: int, repeats: int) -> dict:
    import warnings

    import torch

    from d2g.teacher.loading import load_teacher
    from distill.objective_config import D2GConfig
    from distill.objectives import make_objective

    pipe = load_teacher(teacher)
    kwargs = {"allow_random": True}
    if loss == "pixel_lpips":
        kwargs["vae"] = pipe.vae
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        objective = make_objective("d2g", pipe, D2GConfig(regression_loss=loss, regression_kwargs=kwargs,
                                                          lambda_gan=0.1, r1_every=1000))
    g_opt = torch.optim.AdamW([p for p in objective.generator.parameters() if p.requires_grad], lr=1e-5)
    d_opt = torch.optim.AdamW([p for p in objective.discriminator.parameters() if p.requires_grad], lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    data = {"noise": torch.randn(batch, 4, 64, 64, generator=gen), "latent": torch.randn(batch, 4, 64, 64, generator=gen),
            "prompt": ["a red circle"] * batch}

    def step() -> float:
        began = time.perf_counter()
        for optimizer, loss_fn in ((d_opt, objective.discriminator_loss), (g_opt, objective.generator_loss)):
            optimizer.zero_grad(set_to_none=True)
            value, _ = loss_fn(data, 1)
            value.backward()
            optimizer.step()
        return time.perf_counter() - began

    if loss != "pixel_lpips":
        step()  # warm-up: allocator and optimiser state (a pixel step takes minutes on CPU; its first
        # step's optimiser-state allocation is small next to the decode's activations)
    base = status_kb("VmRSS")
    exact = reset_peak()
    times = [step() for _ in range(repeats)]
    return {"seconds": statistics.median(times), "extra_mb": (status_kb("VmHWM") - base) / 1024, "exact_peak": exact}


def _generation_worker(teacher: str, repeats: int, steps: int, guidance: float) -> dict:
    import torch

    from d2g.teacher.loading import load_teacher
    from d2g.teacher.solver import SolverSettings, TeacherSolver
    from d2g.teacher.vae import decode, to_unit_range
    from distill.export import student_latents

    pipe = load_teacher(teacher)
    noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    prompt = ["a red circle"]
    solver = TeacherSolver(pipe, SolverSettings(steps=steps, guidance=guidance))

    def timed(fn, n) -> float:
        fn()
        began = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - began) / n

    with torch.no_grad():
        student = timed(lambda: student_latents(pipe, prompt, noise), repeats)
        student_dec = timed(lambda: to_unit_range(decode(pipe.vae, student_latents(pipe, prompt, noise))), repeats)
        teacher_lat = timed(lambda: solver.solve(prompt, noise), max(1, repeats // 3))
        teacher_dec = timed(lambda: to_unit_range(decode(pipe.vae, solver.solve(prompt, noise)["latent"])),
                            max(1, repeats // 3))
    return {"student_s": student, "student_decoded_s": student_dec, "teacher_s": teacher_lat,
            "teacher_decoded_s": teacher_dec}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pixel-repeats", type=int, default=1, help="timed pixel-LPIPS steps (minutes each on CPU)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--unet-channels", type=int, nargs="+", default=[64, 128, 256, 256])
    parser.add_argument("--teacher-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        if args.worker == "generation":
            result = _generation_worker(args.teacher, args.repeats, args.teacher_steps, args.guidance)
        else:
            result = _train_step_worker(args.teacher, args.worker, args.batch, args.repeats)
        print(json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        teacher = str(build_sd15_pipeline(Path(tmp) / "teacher", args.unet_channels))
        def worker(case: str, repeats: int, *extra: str) -> dict:
            return run_worker(__file__, [case, "--teacher", teacher, "--threads", str(args.threads), "--repeats",
                                         str(repeats), "--batch", str(args.batch), *extra], args.threads)

        latent = worker("e_latent_lpips", args.repeats)
        pixel = worker("pixel_lpips", args.pixel_repeats)
        gen = worker("generation", args.repeats, "--teacher-steps", str(args.teacher_steps),
                     "--guidance", str(args.guidance))
    print(f"SD1.5-architecture UNet channels {args.unet_channels}, 64x64x4 latents, batch {args.batch}, "
          f"{args.threads} threads, median of {args.repeats} (pixel: {args.pixel_repeats})")
    print(f"{'d2g step':34s} {'seconds':>9s} {'extra MB':>9s}")
    print(f"{'(a) E-LatentLPIPS':34s} {latent['seconds']:9.3f} {latent['extra_mb']:9.0f}")
    print(f"{'(b) pixel LPIPS (decode + VGG)':34s} {pixel['seconds']:9.3f} {pixel['extra_mb']:9.0f}")
    print(f"step time ratio (a)/(b): {latent['seconds'] / pixel['seconds']:.3f}  (goal <= 0.333); "
          f"memory ratio (b)/(a): {pixel['extra_mb'] / max(latent['extra_mb'], 1):.1f}x")
    print(f"{'generation per image':34s} {'latent s':>9s} {'decoded s':>9s}")
    print(f"{'student, 1 step':34s} {gen['student_s']:9.4f} {gen['student_decoded_s']:9.4f}")
    print(f"{f'teacher, {args.teacher_steps} steps, CFG {args.guidance}':34s} {gen['teacher_s']:9.4f} "
          f"{gen['teacher_decoded_s']:9.4f}")
    print(f"speed-up: {gen['teacher_s'] / gen['student_s']:.1f}x to latents (goal >= 40x), "
          f"{gen['teacher_decoded_s'] / gen['student_decoded_s']:.1f}x with the VAE decode")
    return 0


if __name__ == "__main__":
    sys.exit(main())
