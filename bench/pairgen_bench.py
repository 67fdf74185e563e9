"""pairgen throughput against a bare diffusers loop, measured side by side in one run.

(a) a bare loop calling the teacher pipeline with output_type="latent"
(b) pairgen's solver in-process (prompt embeddings encoded once per batch, negative cached)
(c) `pairgen run` through Ray (one actor) writing shards to local disk
(d) the same writing to a moto S3 server on 127.0.0.1

All four use the same teacher, batch size, steps, guidance and one torch thread per worker.
Goal: (c) and (d) reach >= 95% of (a)'s pairs/s per worker. Run: .venv/bin/python bench/pairgen_bench.py
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# The niceness pairgen gives the workers of a local Ray it starts itself (pairgen/runner.py); run
# with RAY_worker_niceness=15 to see Ray's default, under which the busy driver and moto preempt them.
os.environ.setdefault("RAY_worker_niceness", "0")

import torch  # noqa: E402


def build_teacher(folder: Path, channels: tuple[int, int], latent: int) -> Path:
    """An SD1.5-architecture pipeline, larger than the test teachers so compute dominates."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from d2g.teacher.clip_vocab import write_clip_tokenizer

    torch.manual_seed(0)
    tok = write_clip_tokenizer(folder / "tokenizer", words="a red blue green circle square cat dog".split())
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    unet = UNet2DConditionModel(block_out_channels=channels, layers_per_block=1, sample_size=latent,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=8, norm_num_groups=16)
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)
    return folder


def prompts_file(folder: Path) -> Path:
    words = "a red blue green circle square cat dog".split()
    lines = [" ".join(words[(i + k) % len(words)] for k in range(6)) for i in range(64)]
    path = folder / "prompts.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def bare_loop(teacher: Path, prompts: list[str], n: int, batch: int, steps: int, guidance: float) -> float:
    from diffusers import DiffusionPipeline

    from d2g.teacher.noise import batch_noise
    from d2g.teacher.schedulers import build_scheduler

    pipe = DiffusionPipeline.from_pretrained(teacher)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = build_scheduler("ddim", dict(pipe.scheduler.config), "trailing")
    shape = (4, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    began = time.perf_counter()
    for start in range(0, n, batch):
        idx = list(range(start, min(start + batch, n)))
        pipe(prompt=[prompts[j % len(prompts)] for j in idx], latents=batch_noise(0, idx, shape),
             num_inference_steps=steps, guidance_scale=guidance, eta=0.0, output_type="latent")
    return n / (time.perf_counter() - began)


def bare_loop_in_actor(teacher: Path, prompts: list[str], n: int, batch: int, steps: int, guidance: float) -> float:
    """(a) again, inside a Ray actor with pairgen's resources: separates Ray's own cost from pairgen's."""
    import ray

    @ray.remote(num_cpus=0.5)
    def run() -> float:
        torch.set_num_threads(1)
        return bare_loop(teacher, prompts, n, batch, steps, guidance)

    return ray.get(run.remote())


def solver_in_process(teacher: Path, prompts: list[str], n: int, batch: int, steps: int, guidance: float) -> float:
    from d2g.teacher.loading import load_teacher
    from d2g.teacher.noise import batch_noise
    from d2g.teacher.solver import SolverSettings, TeacherSolver

    solver = TeacherSolver(load_teacher(str(teacher)), SolverSettings(steps=steps, guidance=guidance))
    began = time.perf_counter()
    for start in range(0, n, batch):
        idx = list(range(start, min(start + batch, n)))
        solver.solve([prompts[j % len(prompts)] for j in idx], batch_noise(0, idx, solver.latent_shape))
    return n / (time.perf_counter() - began)


def pairgen_run(teacher: Path, prompt_path: Path, out: str, n: int, batch: int, steps: int, guidance: float) -> dict:
    from pairgen.config import load_config
    from pairgen.runner import PairgenRun

    config = load_config(None, dict(teacher=str(teacher), prompts=str(prompt_path), out=out, num_pairs=n,
                                    shard_size=max(batch, n // 4), batch_size=batch, steps=steps, guidance=guidance,
                                    workers=1, threads_per_worker=1))
    return PairgenRun(config, progress=False).run().as_dict()


def start_moto() -> str:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request costs CPU

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        os.environ[key] = value
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("bench-pairs")
    return "s3://bench-pairs/ds"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-pairs", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--channels", type=int, nargs=2, default=(64, 128))
    parser.add_argument("--latent-size", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of all five paths, interleaved so drift on a shared machine hits each "
                             "alike; the table reports each path's median and the median of per-round ratios")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    s3_url = start_moto()  # before Ray starts, so its workers inherit the endpoint
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = build_teacher(tmp / "teacher", tuple(args.channels), args.latent_size)
        prompt_path = prompts_file(tmp)
        prompts = prompt_path.read_text().splitlines()
        common = (args.num_pairs, args.batch_size, args.steps, args.guidance)
        print(f"teacher: SD1.5-architecture UNet channels {tuple(args.channels)}, latents 4x{args.latent_size}x"
              f"{args.latent_size}; {args.num_pairs} pairs, batch {args.batch_size}, {args.steps} DDIM steps, "
              f"guidance {args.guidance}, 1 torch thread per worker, {args.repeat} round(s), Ray worker niceness "
              f"{os.environ['RAY_worker_niceness']}", file=sys.stderr)
        for r in range(args.repeat):
            a = bare_loop(teacher, prompts, *common)
            a_actor = bare_loop_in_actor(teacher, prompts, *common)
            b = solver_in_process(teacher, prompts, *common)
            c = pairgen_run(teacher, prompt_path, str(tmp / f"local{r}"), *common)
            d = pairgen_run(teacher, prompt_path, f"{s3_url}{r}", *common)
            rounds.append({"a": (a, a), "a'": (a_actor, a_actor), "b": (b, b),
                           "c": (c["pairs_per_busy_worker_second"], c["pairs_per_second_per_worker"]),
                           "d": (d["pairs_per_busy_worker_second"], d["pairs_per_second_per_worker"])})
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[0] / a:.3f}" for k, v in rounds[-1].items()), file=sys.stderr)
    ray.shutdown()
    print_table(rounds)
    return 0


def print_table(rounds: list[dict]) -> None:
    """Median pairs/s per path, and the median over rounds of each path's ratio to (a) in the same round."""
    from statistics import median

    names = {"a": "(a) bare diffusers loop", "a'": "(a') the same loop inside a Ray task",
             "b": "(b) pairgen solver in-process", "c": "(c) pairgen run, Ray, local disk",
             "d": "(d) pairgen run, Ray, moto S3"}
    print(f"{'path':36s} {'pairs/s/worker':>15s} {'vs (a)':>8s} {'wall pairs/s':>13s} {'vs (a)':>8s}")
    for key, name in names.items():
        busy = median(r[key][0] for r in rounds)
        wall = median(r[key][1] for r in rounds)
        busy_ratio = median(r[key][0] / r["a"][0] for r in rounds)
        wall_ratio = median(r[key][1] / r["a"][0] for r in rounds)
        print(f"{name:36s} {busy:15.2f} {busy_ratio:8.3f} {wall:13.2f} {wall_ratio:8.3f}")
    if len(rounds) > 1:
        for key in ("c", "d"):
            ratios = sorted(r[key][0] / r["a"][0] for r in rounds)
            print(f"({key})/(a) per round: " + " ".join(f"{x:.3f}" for x in ratios))
    in_ray = {key: median(r[key][0] / r["a'"][0] for r in rounds) for key in ("c", "d")}
    print(f"inside Ray, pairgen against the same bare loop in a Ray task: (c)/(a') {in_ray['c']:.3f}, "
          f"(d)/(a') {in_ray['d']:.3f}")
    print("pairs/s/worker: while the actor works on shards (solve + overlapped write). wall: the whole run,\n"
          "including actor start-up and teacher loading, which a long run amortises.")


if __name__ == "__main__":
    sys.exit(main())
