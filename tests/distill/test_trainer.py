"""The trainer: exact resume (also after SIGKILL), Ray Train DDP, corrupt shards, export to diffusers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.checkpoint import CheckpointError
from distill.export import export_student, load_student, student_latents
from distill.train_config import TrainConfigError, load_train_config
from distill.trainer import KILL_AT_STEP_ENV, Trainer, TrainingStopped
from pairgen.config import load_config
from pairgen.runner import PairgenRun

OBJECTIVE = {"regression_loss": "mse", "lambda_gan": 0.1, "r1_every": 2}


@pytest.fixture(scope="module")
def pairs(ray_local, sd15_teacher, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("train-pairs")
    prompts = folder / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green cat\na red square\n")
    out = str(folder / "pairs")
    PairgenRun(load_config(None, dict(teacher=str(sd15_teacher), prompts=str(prompts), out=out, num_pairs=24,
                                      shard_size=8, steps=3, guidance=2.0, batch_size=4, seed=1)),
               progress=False).run()
    return out


def _config(pairs, teacher, out, **overrides):
    base = dict(data=pairs, teacher=str(teacher), out=str(out), objective="d2g", objective_config=OBJECTIVE,
                max_steps=6, batch_size=4, checkpoint_every=3, log_every=1, use_ray=False, lr_g=1e-4,
                lr_d=1e-4, shuffle_block=8, seed=3)
    base.update(overrides)
    return load_train_config(None, base)


def _metrics(run: Path) -> dict[int, dict]:
    return {row["step"]: row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_resume_reproduces_the_uninterrupted_run(pairs, sd15_teacher, tmp_path):
    straight = Trainer(_config(pairs, sd15_teacher, tmp_path / "a")).run(progress=False)
    assert straight.steps == 6
    Trainer(_config(pairs, sd15_teacher, tmp_path / "b", max_steps=3)).run(progress=False)
    resumed = Trainer(_config(pairs, sd15_teacher, tmp_path / "b")).run(progress=False)
    assert resumed.resumed_from == 3 and resumed.steps == 6
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    for step in (4, 5, 6):
        assert a[step]["data/order_xxh3"] == b[step]["data/order_xxh3"], step
        for key in ("g/total", "d/total"):
            assert a[step][key] == pytest.approx(b[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert straight.rank_weight_hashes == resumed.rank_weight_hashes


def test_sigkill_between_checkpoints_then_resume(pairs, sd15_teacher, tmp_path):
    reference = Trainer(_config(pairs, sd15_teacher, tmp_path / "ref", max_steps=7)).run(progress=False)
    exe = str(Path(sys.executable).parent / "distill")
    args = [exe, "train", "--data", pairs, "--teacher", str(sd15_teacher), "--out", str(tmp_path / "run"),
            "--objective", "d2g", "--objective-config", json.dumps(OBJECTIVE), "--max-steps", "7",
            "--batch-size", "4", "--checkpoint-every", "3", "--log-every", "1", "--no-ray", "--lr-g", "1e-4",
            "--lr-d", "1e-4", "--shuffle-block", "8", "--seed", "3", "--no-progress", "--json"]
    killed = subprocess.run(args, env=dict(os.environ, **{KILL_AT_STEP_ENV: "5"}), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = subprocess.run(args, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = json.loads(resumed.stdout)
    assert summary["resumed_from"] == 3 and summary["steps"] == 7
    # This session's CPU time (what bench/results.py reports beside wall time): measured, and no
    # more than every core busy for the whole session.
    assert 0 < summary["cpu_seconds"] <= summary["seconds"] * (os.cpu_count() or 1) + 1
    ref, run = _metrics(tmp_path / "ref"), _metrics(tmp_path / "run")
    for step in (4, 5, 6, 7):
        assert run[step]["data/order_xxh3"] == ref[step]["data/order_xxh3"], step
    assert summary["rank_weight_hashes"] == reference.rank_weight_hashes


def test_two_ray_train_workers_end_with_identical_weights_and_v_shows_ray(ray_local, pairs, sd15_teacher, tmp_path):
    """Two DDP ranks on Ray Train end with equal weights; run as a user would, with -v and stderr
    not a terminal: Ray's own output (workers' lines, Ray Train's banners) is shown, in plain text."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "distill"), "train", "--data", pairs, "--teacher", str(sd15_teacher),
         "--out", str(tmp_path / "ddp"), "--objective", "d2g", "--objective-config", json.dumps(OBJECTIVE),
         "--max-steps", "3", "--batch-size", "4", "--checkpoint-every", "3", "--log-every", "1", "--lr-g", "1e-4",
         "--lr-d", "1e-4", "--shuffle-block", "8", "--seed", "3", "--workers", "2", "--cpus-per-worker", "0.5",
         "--threads", "1", "--json", "-v"],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    hashes = summary["rank_weight_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    assert summary["steps"] == 3
    assert (tmp_path / "ddp" / "checkpoints" / "step-00000003" / "COMPLETE").exists()
    assert "(RayTrainWorker pid=" in result.stderr and "Started training worker group" in result.stderr
    assert not re.search(r"\x1b\[[0-9;]*m", result.stderr), "Ray colours its prefixes only on a terminal"


def test_corrupt_shard_is_named_or_skipped(pairs, sd15_teacher, tmp_path):
    import shutil

    from store import CorruptShardError

    copy = tmp_path / "pairs"
    shutil.copytree(pairs, copy)
    tar = copy / "shards" / "shard-000001.tar"
    data = bytearray(tar.read_bytes())
    data[2000] ^= 0xFF
    tar.write_bytes(bytes(data))
    with pytest.raises(CorruptShardError, match="shard-000001"):
        Trainer(_config(str(copy), sd15_teacher, tmp_path / "raise", max_steps=8)).run(progress=False)
    summary = Trainer(_config(str(copy), sd15_teacher, tmp_path / "skip", max_steps=8,
                              on_corrupt="skip")).run(progress=False)
    assert summary.steps == 8 and summary.skipped_shards.get("shard-000001", 0) > 0


def test_non_finite_loss_stops_and_keeps_last_checkpoint(pairs, sd15_teacher, tmp_path):
    Trainer(_config(pairs, sd15_teacher, tmp_path / "run", max_steps=3)).run(progress=False)
    with pytest.raises(TrainingStopped, match="last good checkpoint: step 3"):
        Trainer(_config(pairs, sd15_teacher, tmp_path / "run", lr_g=1e30, lr_d=1e30, clip_grad=0.0,
                        max_steps=12)).run(progress=False)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())[0] == "step-00000003"


def test_export_loads_in_stock_diffusers_and_matches_generate(pairs, sd15_teacher, tmp_path):
    from diffusers import DiffusionPipeline

    Trainer(_config(pairs, sd15_teacher, tmp_path / "run", max_steps=3)).run(progress=False)
    info = export_student(str(tmp_path / "run"), str(tmp_path / "export"))
    folder = tmp_path / "export"
    assert info["step"] == 3 and (folder / "README.md").read_text().startswith("---\nlibrary_name: diffusers")
    stock = DiffusionPipeline.from_pretrained(folder)
    stock.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square"]
    ours = student_latents(load_student(str(folder)), prompts, noise)
    theirs = stock(prompt=prompts, latents=noise, num_inference_steps=1, guidance_scale=0.0,
                   output_type="latent").images
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    gen = subprocess.run([str(Path(sys.executable).parent / "distill"), "generate", str(folder), "--prompt",
                          "a red circle", "--num", "2", "--out", str(tmp_path / "png"), "--json"],
                         capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert len(json.loads(gen.stdout)["images"]) == 2
    again = subprocess.run([str(Path(sys.executable).parent / "distill"), "generate", str(folder), "--prompt",
                            "a blue square", "--seed", "7", "--out", str(tmp_path / "png"), "--json"],
                           capture_output=True, text=True)
    assert [Path(p).name for p in json.loads(again.stdout)["images"]] == ["image-002.png"]  # never overwrites
    from PIL import Image

    text = Image.open(tmp_path / "png" / "image-002.png").text
    assert text["prompt"] == "a blue square" and text["seed"] == "7" and text["steps"] == "1"
    with pytest.raises(CheckpointError, match="not empty"):
        export_student(str(tmp_path / "run"), str(folder))
    ev = subprocess.run([str(Path(sys.executable).parent / "distill"), "eval", "--model", str(folder), "--data",
                         pairs, "--num", "8", "--teacher-steps", "3", "--json"], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr[-2000:]
    report = json.loads(ev.stdout)
    assert report["num_pairs"] == 8 and report["student_mse"] >= 0 and report["teacher_1step_mse"] > 0
    assert report["latency_student_s"] > 0 and report["speedup_vs_teacher"] > 0


def test_preview_grid_is_written(pairs, sd15_teacher, tmp_path):
    from PIL import Image

    Trainer(_config(pairs, sd15_teacher, tmp_path / "run", max_steps=2, preview_every=2)).run(progress=False)
    image = Image.open(tmp_path / "run" / "previews" / "step-00000002.png")
    assert image.size == (8 * 16, 16)


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(TrainConfigError, match="max_steps"):
        load_train_config(None, {"max_steps": 0})
    with pytest.raises(TrainConfigError, match="objective_config.lambda_gan"):
        load_train_config(None, {"objective_config": {"lambda_gan": -1}})
    with pytest.raises(TrainConfigError, match="objective_config.d2g_multiscale"):
        load_train_config(None, {"objective": "add", "objective_config": {"d2g_multiscale": False}})
    bad = tmp_path / "t.yaml"
    bad.write_text("objectiv: d2g\n")
    with pytest.raises(TrainConfigError, match="objectiv"):
        load_train_config(str(bad))


def test_objective_config_is_typed_once_and_round_trips(tmp_path):
    from distill.objective_config import ADDConfig, D2GConfig
    from distill.train_config import TrainConfig

    yaml_file = tmp_path / "t.yaml"
    yaml_file.write_text("objective: add\nobjective_config:\n  student_steps: 4\n  r1_gamma: 1.0e-4\n")
    config = load_train_config(str(yaml_file))
    assert isinstance(config.objective_config, ADDConfig)
    assert (config.objective_config.student_steps, config.objective_config.lambda_sd) == (4, 2.5)
    saved = json.loads(json.dumps(config.model_dump(mode="json")))  # what a checkpoint's state.json holds
    assert saved["objective_config"]["add_t_logit_std"] == 1.0, "the objective's own fields are saved"
    assert TrainConfig(**saved) == config
    # Checkpoints written before the config was typed hold only the options that were given.
    old = {**saved, "objective": "d2g", "objective_config": OBJECTIVE}
    assert TrainConfig(**old).objective_config == D2GConfig(**OBJECTIVE)


def test_trains_from_and_to_s3(pairs, sd15_teacher, s3_bucket):
    import fsspec

    fs = fsspec.filesystem("s3")
    fs.put(pairs + "/", f"{s3_bucket}/pairs/", recursive=True)
    run = f"{s3_bucket}/run"
    first = Trainer(_config(f"{s3_bucket}/pairs@v1", sd15_teacher, run, max_steps=3)).run(progress=False)
    again = Trainer(_config(f"{s3_bucket}/pairs@v1", sd15_teacher, run, max_steps=4)).run(progress=False)
    assert first.steps == 3 and again.resumed_from == 3 and again.steps == 4
    assert fs.exists(f"{run}/checkpoints/step-00000004/COMPLETE")
    assert len(fs.cat_file(f"{run}/metrics.jsonl").decode().splitlines()) == 4


def test_a_newer_version_is_picked_up_at_an_epoch_boundary(ray_local, sd15_teacher, tmp_path, monkeypatch):
    import distill.trainer
    from store import PairStore

    opened = []

    class CountedPairStore(PairStore):
        def __init__(self, *args, **kwargs):
            opened.append(args)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(distill.trainer, "PairStore", CountedPairStore)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    data = str(tmp_path / "pairs")

    def generate(num_pairs):
        PairgenRun(load_config(None, dict(teacher=str(sd15_teacher), prompts=str(prompts), out=data,
                                          num_pairs=num_pairs, shard_size=8, steps=2, guidance=2.0,
                                          batch_size=4, seed=1)), progress=False).run()

    generate(16)
    trainer = Trainer(_config(data, sd15_teacher, tmp_path / "run", max_steps=7))  # opens v1: 4 steps/epoch
    generate(24)  # pairgen extends the dataset while training runs
    summary = trainer.run(progress=False)
    assert summary.data_version == 2
    seen = _metrics(tmp_path / "run")
    assert max(seen[s]["data/index_max"] for s in range(1, 5)) < 16, "epoch 0 reads v1"
    assert trainer.dataset.num_samples == 24 and trainer.dataset.epoch == 1, "epoch 1 streams v2"
    assert len(opened) == 1, "the trainer opens the store once, new versions included"
    with pytest.raises(TrainingStopped, match="already holds checkpoints"):
        Trainer(_config(data, sd15_teacher, tmp_path / "run", resume=False))


def test_outputs_reach_an_object_store_and_relative_paths_survive_ray(pairs, sd15_teacher, s3_bucket, tmp_path,
                                                                       ray_local):
    """Every output goes through fsspec to the URL given: checkpoints, metrics, TensorBoard and the
    export land in the bucket (nothing in a local folder named 's3:'); and a Ray Train run given
    relative --data and --out reads and writes under the user's working directory."""
    import fsspec

    from distill.ray_launch import train

    run = f"{s3_bucket}/runs/r1"
    train(_config(pairs, sd15_teacher, run, max_steps=2, checkpoint_every=2))
    fs = fsspec.filesystem("s3")
    assert fs.glob(f"{run}/tensorboard/*tfevents*"), "TensorBoard events did not reach the bucket"
    info = export_student(run, f"{s3_bucket}/student")
    assert info["step"] == 2 and fs.exists(f"{s3_bucket}/student/unet/config.json")
    assert fs.cat(f"{s3_bucket}/student/README.md").decode().startswith("---\nlibrary_name: diffusers")
    assert not (Path.cwd() / "s3:").exists()

    # The same in Ray Train mode from the command line, as a user runs it (stderr not a terminal, no -v):
    # what it prints is the driver's own lines, nothing forwarded from Ray (the -v counterpart is
    # test_two_ray_train_workers_end_with_identical_weights_and_v_shows_ray).
    os.symlink(pairs, tmp_path / "pairs")
    result = subprocess.run([str(Path(sys.executable).parent / "distill"), "train", "--data", "pairs", "--teacher",
                             str(sd15_teacher), "--out", "runs/rel", "--objective", "regression", "--max-steps", "2",
                             "--batch-size", "4", "--cpus-per-worker", "0.5", "--json"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["out"] == str(tmp_path / "runs" / "rel")
    assert (tmp_path / "runs" / "rel" / "checkpoints" / "step-00000002" / "COMPLETE").exists()
    lines = result.stderr.splitlines()
    assert "\x1b" not in result.stderr and "\r" not in result.stderr, "no ANSI codes, no bar refreshes"
    assert not any("pid=" in line or "it/s]" in line for line in lines), result.stderr
    # log_every (10) > max_steps (2): one progress line, for the last step; then the summary. A third
    # line is allowed only for the notice the driver prints if no worker started within 2 minutes.
    assert len(lines) <= 3, result.stderr
    assert sum(line.startswith("distill: step 2/2 ") and "steps/s" in line and "ETA" in line for line in lines) == 1
    assert lines[-1].startswith("distill: 2 steps in "), result.stderr
