"""Cost of the regression loss per training iteration: pixel LPIPS (decode + VGG16) vs E-LatentLPIPS.

    .venv/bin/python bench/lpips_cost.py [--batches 1 4] [--threads 1] [--repeats 3] [--pixel-repeats 1]

(a) pixel LPIPS at 512x512: 64x64x4 latents decoded by an SD1.5-architecture AutoencoderKL
    (block_out_channels 128/256/512/512, 2 layers per block; random weights), then VGG16 LPIPS.
(b) E-LatentLPIPS (official architecture, random weights, preset "bg") on the same latents.
Each measures one forward + backward of loss(pred, target).sum() with gradients to pred only, as
in generator training. Weights are random: cost does not depend on their values.

Memory: every case runs in a fresh subprocess. After the models and inputs exist, the process
resets its RSS high-water mark (`echo 5 > /proc/self/clear_refs`, Linux >= 4.0) and reads VmHWM
from /proc/self/status after the iterations: "extra" = peak RSS during the iterations minus RSS
before them, i.e. the activations and gradients an iteration adds (the paper's "extra memory").
No tracemalloc: it does not see torch's C++ allocations. Where clear_refs is unavailable the
peak includes setup and the figure is marked as an upper bound. Workers run with a fixed glibc
mmap threshold (MALLOC_MMAP_THRESHOLD_, default 64 KiB; --malloc-mmap-threshold 0 leaves glibc's
dynamic default): large tensors are then mmapped and returned on free, so RSS follows live tensor
memory instead of heap fragmentation (which inflated small-case peaks by ~100 MB here).

Pixel cases whose memory, extrapolated from a smaller batch already measured, would exceed
--max-mem-gb are skipped with a note rather than risking the OOM killer on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from measure import SD15_VAE, reset_peak, run_worker, status_kb  # noqa: E402


def build_loss(case: str):
    import torch

    from distill.losses import make_regression_loss

    torch.manual_seed(0)
    if case == "pixel":
        import warnings

        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**SD15_VAE)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-weights warning: expected here
            return make_regression_loss("pixel_lpips", vae=vae, allow_random=True)
    if case == "elatent":
        return make_regression_loss("e_latent_lpips", allow_random=True, latent_channels=4, augment="bg")
    raise ValueError(f"unknown case {case!r}")


def worker(case: str, batch: int, repeats: int, warmup: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    loss_fn = build_loss(case)
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(batch, 4, 64, 64, generator=g).requires_grad_(True)
    target = torch.randn(batch, 4, 64, 64, generator=g)

    def iteration() -> float:
        start = time.perf_counter()
        loss_fn(pred, target).sum().backward()
        pred.grad = None
        return time.perf_counter() - start

    baseline_kb = status_kb("VmRSS")
    exact = reset_peak()
    times = [iteration() for _ in range(warmup + repeats)][warmup:]
    peak_kb = status_kb("VmHWM")
    return {
        "case": case, "batch": batch, "threads": threads, "repeats": repeats,
        "seconds": statistics.median(times), "seconds_all": times,
        "extra_mb": (peak_kb - baseline_kb) / 1024, "baseline_mb": baseline_kb / 1024, "exact_peak": exact,
    }  # fmt: skip


def run_case(case: str, batch: int, repeats: int, warmup: int, threads: int, mmap_threshold: int) -> dict:
    args = [case, "--batches", str(batch), "--repeats", str(repeats), "--warmup", str(warmup), "--threads", str(threads)]
    return run_worker(__file__, args, threads, mmap_threshold)


def _available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024 / 1024
    return float("inf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed E-LatentLPIPS iterations per case (median)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed E-LatentLPIPS iterations first")
    parser.add_argument(
        "--pixel-repeats",
        type=int,
        default=1,
        help="timed pixel-LPIPS iterations (each takes tens of seconds on CPU)",
    )
    parser.add_argument("--pixel-warmup", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per case (cases run one at a time)"
    )
    parser.add_argument(
        "--max-mem-gb",
        type=float,
        default=None,
        help="skip pixel cases estimated above this (default: 60%% of MemAvailable)",
    )
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=65536,
        help="glibc MALLOC_MMAP_THRESHOLD_ for the workers, bytes (0: glibc's dynamic default)",
    )
    parser.add_argument("--worker", choices=["pixel", "elatent"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(args.worker, args.batches[0], args.repeats, args.warmup, args.threads)))
        return 0

    limit_gb = args.max_mem_gb if args.max_mem_gb is not None else 0.6 * _available_gb()
    started = time.time()
    results: dict[tuple[str, int], dict] = {}
    per_sample_gb = None
    for batch in sorted(args.batches):
        if per_sample_gb is not None and per_sample_gb * batch > limit_gb:
            print(
                f"pixel   batch {batch}: SKIPPED, estimated {per_sample_gb * batch:.1f} GB extra > limit {limit_gb:.1f} GB",
                flush=True,
            )
        else:
            r = results[("pixel", batch)] = run_case(
                "pixel",
                batch,
                args.pixel_repeats,
                args.pixel_warmup,
                args.threads,
                args.malloc_mmap_threshold,
            )
            per_sample_gb = r["extra_mb"] / 1024 / batch
            print(
                f"pixel   batch {batch}: {r['seconds']:8.3f} s/iter  extra {r['extra_mb']:9.1f} MB  (baseline RSS {r['baseline_mb']:.0f} MB)",
                flush=True,
            )
        r = results[("elatent", batch)] = run_case(
            "elatent", batch, args.repeats, args.warmup, args.threads, args.malloc_mmap_threshold
        )
        print(
            f"elatent batch {batch}: {r['seconds']:8.3f} s/iter  extra {r['extra_mb']:9.1f} MB  (baseline RSS {r['baseline_mb']:.0f} MB)",
            flush=True,
        )

    print(
        f"\nthreads={args.threads}; MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold or 'glibc default'}; peak reset via clear_refs: {all(r['exact_peak'] for r in results.values())}"
    )
    print(
        f"{'batch':>5} {'pixel s':>9} {'E-LL s':>9} {'speedup':>8} {'pixel MB':>10} {'E-LL MB':>9} {'mem ratio':>9}"
    )
    for batch in sorted(args.batches):
        e = results[("elatent", batch)]
        p = results.get(("pixel", batch))
        if p is None:
            print(
                f"{batch:>5} {'skipped':>9} {e['seconds']:>9.3f} {'-':>8} {'skipped':>10} {e['extra_mb']:>9.1f} {'-':>9}"
            )
            continue
        print(
            f"{batch:>5} {p['seconds']:>9.3f} {e['seconds']:>9.3f} {p['seconds'] / e['seconds']:>7.1f}x "
            f"{p['extra_mb']:>10.1f} {e['extra_mb']:>9.1f} {p['extra_mb'] / max(e['extra_mb'], 1e-3):>8.1f}x"
        )
    print("goal (paper, A100): >= 9.7x faster, >= 20x less memory (117 ms vs 12.1 ms; 15.0 GB vs 0.6 GB)")
    print(f"total wall time {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
