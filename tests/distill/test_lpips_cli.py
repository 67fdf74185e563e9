"""`distill lpips train-trunk` and `distill lpips calibrate` on tiny synthetic latents, through the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.cli import main

TRUNK_ARGS = [
    "--steps",
    "4",
    "--batch-size",
    "4",
    "--width",
    "0.125",
    "--checkpoint-every",
    "2",
    "--log-every",
    "1",
    "--lr",
    "0.05",
]
CAL_ARGS = ["--steps", "4", "--batch-size", "6", "--checkpoint-every", "2", "--log-every", "1", "--lr", "0.5"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    g = np.random.default_rng(0)
    for name, mean in [("cats", 1.0), ("dogs", -1.0)]:
        (root / name).mkdir()
        for i in range(6):
            latent = (g.standard_normal((4, 8, 8)) + mean).astype(np.float32)
            if i % 2:
                save_file({"latent": torch.from_numpy(latent)}, str(root / name / f"{i}.safetensors"))
            else:
                np.save(root / name / f"{i}.npy", latent)
    return root


@pytest.fixture(scope="module")
def triplets(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("triplets")
    g = torch.Generator().manual_seed(0)
    for shard in range(2):
        ref = torch.randn(8, 4, 8, 8, generator=g)
        near, far = ref + 0.1 * torch.randn_like(ref), ref + torch.randn_like(ref)
        swap = torch.rand(8, generator=g) < 0.5
        p0 = torch.where(swap[:, None, None, None], far, near)
        p1 = torch.where(swap[:, None, None, None], near, far)
        judge = swap.float() * 0.8 + 0.1  # people mostly pick the near one
        save_file({"ref": ref, "p0": p0, "p1": p1, "judge": judge}, str(root / f"shard-{shard}.safetensors"))
    return root


def with_steps(args: list[str], steps: int) -> list[str]:
    i = args.index("--steps")
    return [*args[: i + 1], str(steps), *args[i + 2 :]]


def run(*argv: str) -> int:
    return main(["lpips", *argv])


def checkpoint_state(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)


def test_help_of_the_installed_command():
    exe = Path(sys.executable).parent / "distill"
    result = subprocess.run(
        [str(exe), "lpips", "train-trunk", "--help"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--resume" in result.stdout and "--checkpoint-every" in result.stdout


def test_train_trunk_resume_matches_an_uninterrupted_run(labelled, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert run("train-trunk", "--data", str(labelled), "--out", str(full), *TRUNK_ARGS) == 0
    assert checkpoint_state(full)["step"] == 4

    stopped = with_steps(TRUNK_ARGS, 2)  # same options, only 2 of the 4 steps
    assert run("train-trunk", "--data", str(labelled), "--out", str(part), *stopped) == 0
    assert checkpoint_state(part)["step"] == 2
    capsys.readouterr()
    assert run("train-trunk", "--data", str(labelled), "--out", str(part), *TRUNK_ARGS, "--resume") == 0
    assert '"event": "resume", "step": 2' in capsys.readouterr().out

    a, b = checkpoint_state(full), checkpoint_state(part)
    assert b["step"] == 4
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    trunk_full, trunk_part = (
        load_file(str(full / "trunk.safetensors")),
        load_file(str(part / "trunk.safetensors")),
    )
    assert trunk_full.keys() == trunk_part.keys() and "features.40.weight" in trunk_full
    assert all(torch.equal(trunk_full[k], trunk_part[k]) for k in trunk_full)
    # Training changed the weights (the comparison above is not between two untouched inits).
    torch.manual_seed(0)
    from distill.lpips import LatentVGG16BN

    assert not torch.equal(
        trunk_full["features.0.weight"], LatentVGG16BN(4, 0.125).features[0].weight.detach()
    )


def test_existing_run_is_not_overwritten_and_bad_options_are_named(labelled, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        run(
            "train-trunk",
            "--data",
            str(labelled),
            "--out",
            str(out),
            *TRUNK_ARGS[:2],
            "--batch-size",
            "2",
            "--width",
            "0.125",
        )
        == 0
    )
    before = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert (
        run("train-trunk", "--data", str(labelled), "--out", str(out), "--steps", "2", "--width", "0.125")
        == 2
    )
    assert "--resume" in capsys.readouterr().err
    assert (out / "checkpoint.pt").read_bytes() == before
    assert (
        run(
            "train-trunk",
            "--data",
            str(labelled),
            "--out",
            str(out),
            "--steps",
            "6",
            "--batch-size",
            "2",
            "--width",
            "0.25",
            "--resume",
        )
        == 2
    )
    assert "'width'" in capsys.readouterr().err
    assert run("train-trunk", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "x")) == 2
    assert "nope" in capsys.readouterr().err


def test_calibrate_resume_matches_and_heads_stay_non_negative(labelled, triplets, tmp_path, capsys):
    trunk_dir = tmp_path / "trunk"
    assert run("train-trunk", "--data", str(labelled), "--out", str(trunk_dir), *TRUNK_ARGS) == 0
    trunk = str(trunk_dir / "trunk.safetensors")

    full, part = tmp_path / "cal-full", tmp_path / "cal-part"
    assert run("calibrate", "--data", str(triplets), "--trunk", trunk, "--out", str(full), *CAL_ARGS) == 0
    stopped = with_steps(CAL_ARGS, 2)
    assert run("calibrate", "--data", str(triplets), "--trunk", trunk, "--out", str(part), *stopped) == 0
    assert (
        run("calibrate", "--data", str(triplets), "--trunk", trunk, "--out", str(part), *CAL_ARGS, "--resume")
        == 0
    )

    a, b = load_file(str(full / "lpips.safetensors")), load_file(str(part / "lpips.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    heads = [a[f"lins.{k}.model.1.weight"] for k in range(5)]
    assert all(float(h.min()) >= 0 for h in heads)
    assert any(not torch.equal(h, torch.ones_like(h)) for h in heads), "heads never moved"
    # The trunk is frozen: calibration leaves it exactly as trained.
    assert torch.equal(a["trunk.features.0.weight"], load_file(trunk)["features.0.weight"])

    from distill.losses import make_regression_loss

    loss = make_regression_loss("e_latent_lpips", weights=full / "lpips.safetensors")
    x = torch.randn(2, 4, 8, 8)
    assert loss(x, torch.randn(2, 4, 8, 8)).shape == (2,)


def test_calibrate_names_a_bad_shard(labelled, triplets, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    ref = torch.randn(2, 4, 8, 8)
    save_file(
        {"ref": ref, "p0": ref.clone(), "p1": ref.clone(), "judge": torch.tensor([0.5, 1.5])},
        str(bad / "b.safetensors"),
    )
    trunk_dir = tmp_path / "trunk"
    assert (
        run(
            "train-trunk",
            "--data",
            str(labelled),
            "--out",
            str(trunk_dir),
            "--steps",
            "1",
            "--width",
            "0.125",
            "--batch-size",
            "2",
        )
        == 0
    )
    capsys.readouterr()
    code = run(
        "calibrate",
        "--data",
        str(bad),
        "--trunk",
        str(trunk_dir / "trunk.safetensors"),
        "--out",
        str(tmp_path / "c"),
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "b.safetensors" in err and "judge" in err
