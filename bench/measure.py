"""Shared measuring tools for the benchmarks: peak RSS per case in a fresh process, medians."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Stable Diffusion 1.5's VAE architecture (random weights are fine for cost measurements).
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32, sample_size=512, scaling_factor=0.18215,
)  # fmt: skip


def status_kb(field: str) -> int:
    """A field of /proc/self/status in KiB (VmRSS: now; VmHWM: peak since the last reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> bool:
    """Reset the RSS high-water mark (Linux >= 4.0); False where unsupported (peaks are then upper bounds)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_worker(script: str, args: list[str], threads: int, mmap_threshold: int = 65536) -> dict:
    """Run `script --worker ...` in a fresh interpreter; its last stdout line is a JSON result."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if mmap_threshold > 0:
        # Large tensors mmapped and returned on free: RSS then follows live tensor memory.
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    out = subprocess.run([sys.executable, script, "--worker", *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{Path(script).name} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
