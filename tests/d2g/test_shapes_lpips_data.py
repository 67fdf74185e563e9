"""`d2g.shapes.lpips_data`: LatentLPIPS data for the shapes VAE, and a tiny train + calibrate on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from d2g.shapes import lpips_data, world
from distill.lpips.data import LabelledLatentFolder, load_triplets

N_LATENTS, N_TRIPLETS, SHARD = 64, 32, 16


@pytest.fixture(scope="module")
def models():
    from d2g.shapes.evaluator import Evaluator

    return lpips_data.load_vae(), Evaluator.load()


def make_labelled(out: Path, models, seed: int = 0, label: str = "shape_color") -> dict:
    return lpips_data.build_labelled(
        out, N_LATENTS, seed=seed, label=label, batch_size=32, vae=models[0], progress=False
    )


def make_triplets(out: Path, models, seed: int = 1) -> dict:
    vae, evaluator = models
    return lpips_data.build_triplets(
        out,
        N_TRIPLETS,
        shard_size=SHARD,
        seed=seed,
        batch_size=16,
        vae=vae,
        evaluator=evaluator,
        progress=False,
    )


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, models) -> Path:
    out = tmp_path_factory.mktemp("data") / "labelled"
    make_labelled(out, models)
    return out


@pytest.fixture(scope="module")
def triplets(tmp_path_factory, models) -> Path:
    out = tmp_path_factory.mktemp("data") / "triplets"
    make_triplets(out, models)
    return out


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_labelled_folder_reads_with_the_classes_and_latents_of_the_world(labelled, models):
    data = LabelledLatentFolder(labelled)
    _, _, attrs = world.batch(0, 0, N_LATENTS, "train")
    expected = sorted({f"{a.shape}-{a.color}" for a in attrs})
    assert data.classes == expected and 2 <= len(expected) <= 18
    assert len(data) == N_LATENTS and data.latent_shape == (4, 8, 8)
    latents, labels = data.batch(torch.arange(len(data)))
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
    # Every file sits in its item's class folder and holds that image's diffusion latent
    # (posterior mean x scaling factor), checked against an independent encode.
    vae = models[0]
    index = 5
    image, _, a = world.item(0, index, "train")
    path = labelled / f"{a.shape}-{a.color}" / f"{index:07d}.npy"
    with torch.no_grad():
        want = vae.encode(world.to_tensor(image[None])).latent_dist.mean[0] * vae.config.scaling_factor
    torch.testing.assert_close(torch.from_numpy(np.load(path)), want, atol=1e-4, rtol=1e-4)
    assert 0.3 < float(latents.std()) < 3, "latents are not on the diffusion (unit-variance) scale"


def test_combination_label_through_the_cli(tmp_path, capsys):
    out = tmp_path / "combo"
    argv = ["labelled", "--out", str(out), "--n", "40", "--label", "combination", "--json", "--no-progress"]
    assert lpips_data.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    _, _, attrs = world.batch(0, 0, 40, "train")
    classes = {lpips_data.class_name(a, "combination") for a in attrs}
    assert summary["classes"] == len(classes) == len(LabelledLatentFolder(out).classes)
    assert summary["possible_classes"] == 488
    # A second run into the same folder is refused, not mixed in.
    assert lpips_data.main(argv) == 2
    assert "not empty" in capsys.readouterr().err


def test_triplets_load_with_a_soft_judge_that_follows_the_evaluator(triplets):
    shards = sorted(triplets.glob("*.safetensors"))
    assert len(shards) == N_TRIPLETS // SHARD
    data = load_triplets(triplets)
    assert len(data) == N_TRIPLETS and tuple(data.ref.shape[1:]) == (4, 8, 8)
    assert bool(((data.judge >= 0) & (data.judge <= 1)).all())
    assert float(data.judge.std()) > 0.05, "judge is (nearly) constant"
    assert not torch.equal(data.p0, data.ref) and not torch.equal(data.p1, data.p0)
    with safe_open(str(shards[0]), "pt") as f:
        meta = json.loads(f.metadata()[lpips_data.META_KEY])
    d0, d1 = torch.tensor(meta["d0"]), torch.tensor(meta["d1"])
    # judge > 0.5 exactly when p1 is the closer one.
    assert torch.equal(data.judge[:SHARD] > 0.5, d1 < d0)
    assert set(meta["kind0"]) <= set(lpips_data.KINDS)


def test_same_seed_is_byte_identical_and_another_seed_is_not(labelled, triplets, models, tmp_path):
    make_labelled(tmp_path / "lab", models)
    make_triplets(tmp_path / "tri", models)
    assert folder_bytes(tmp_path / "lab") == folder_bytes(labelled)
    assert folder_bytes(tmp_path / "tri") == folder_bytes(triplets)
    make_triplets(tmp_path / "tri-other", models, seed=2)
    assert load_triplets(tmp_path / "tri-other").ref.shape == load_triplets(triplets).ref.shape
    assert not torch.equal(load_triplets(tmp_path / "tri-other").ref, load_triplets(triplets).ref)


def test_a_tiny_shapes_latent_lpips_trains_calibrates_and_loads(labelled, triplets, tmp_path):
    from distill.losses import make_regression_loss
    from distill.lpips.calibrate import CalibrateConfig, calibrate
    from distill.lpips.train_trunk import TrunkTrainConfig, train_trunk

    trunk = train_trunk(
        TrunkTrainConfig(
            data=str(labelled), out=str(tmp_path / "trunk"), steps=3, batch_size=8, width=0.125, lr=0.05
        )
    )
    lpips = calibrate(
        CalibrateConfig(
            data=str(triplets), trunk=str(trunk), out=str(tmp_path / "cal"), steps=3, batch_size=8, lr=0.5
        )
    )
    assert lpips.name == "lpips.safetensors"
    # Channels and width come from the file's metadata; passing them again is a duplicate kwarg.
    loss = make_regression_loss("latent_lpips", weights=lpips)
    assert loss.net.latent_channels == 4 and loss.net.width == 0.125
    data = load_triplets(triplets)
    distance = loss(data.ref[:6], data.p0[:6])
    assert distance.shape == (6,) and torch.isfinite(distance).all() and bool((distance >= 0).all())
    assert bool((distance > 0).all()), "distinct latents at distance zero"
    assert torch.equal(loss(data.ref[:6], data.ref[:6].clone()), torch.zeros(6))


@pytest.fixture(scope="module")
def pixel_data(tmp_path_factory, models) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pixel")
    vae, evaluator = models
    lpips_data.build_labelled(
        root / "labelled", N_LATENTS, seed=0, batch_size=32, vae=vae, progress=False, space="pixel"
    )
    lpips_data.build_triplets(
        root / "triplets", N_TRIPLETS, shard_size=SHARD, seed=1, batch_size=16, vae=vae, evaluator=evaluator,
        progress=False, space="pixel",
    )  # fmt: skip
    return root / "labelled", root / "triplets"


def test_pixel_space_holds_the_decodes_of_the_same_latents_with_the_same_judgements(
    pixel_data, labelled, triplets, models
):
    from d2g.teacher.vae import decode

    vae = models[0]
    pixel_labelled, pixel_triplets = pixel_data
    images = LabelledLatentFolder(pixel_labelled)
    assert images.classes == LabelledLatentFolder(labelled).classes and images.latent_shape == (3, 32, 32)
    path = next((labelled / images.classes[0]).glob("*.npy"))
    with torch.no_grad():
        want = decode(vae, torch.from_numpy(np.load(path))[None])[0]
    got = torch.from_numpy(np.load(pixel_labelled / images.classes[0] / path.name))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    pixels, latents = load_triplets(pixel_triplets), load_triplets(triplets)
    assert tuple(pixels.ref.shape[1:]) == (3, 32, 32) and float(pixels.ref.abs().max()) <= 1
    assert torch.equal(pixels.judge, latents.judge), "the pixel triplets must be the same judged triplets"
    with torch.no_grad():
        torch.testing.assert_close(pixels.p1[:4], decode(vae, latents.p1[:4]), atol=1e-5, rtol=1e-5)


def test_a_tiny_shapes_pixel_lpips_trains_calibrates_and_drives_the_pixel_lpips_loss(pixel_data, models, tmp_path):
    from distill.losses import make_regression_loss
    from distill.lpips.calibrate import CalibrateConfig, calibrate
    from distill.lpips.checkpoints import CheckpointError, trunk_file_shape
    from distill.lpips.pixel import load_pixel_trunk_lpips
    from distill.lpips.train_trunk import TrunkTrainConfig, train_trunk

    pixel_labelled, pixel_triplets = pixel_data
    trunk = train_trunk(TrunkTrainConfig(
        data=str(pixel_labelled), out=str(tmp_path / "trunk"), steps=2, batch_size=8, width=0.125, pools_removed=0,
    ))  # fmt: skip
    assert trunk_file_shape(trunk) == (3, 0.125, 0)
    lpips = calibrate(CalibrateConfig(
        data=str(pixel_triplets), trunk=str(trunk), out=str(tmp_path / "cal"), steps=2, batch_size=8, lr=0.5,
    ))  # fmt: skip
    vae = models[0]
    loss = make_regression_loss("pixel_lpips", vae=vae, weights=lpips)
    assert loss.net.lpips.pools_removed == 0 and loss.net.lpips.l1_weight == 0
    decodes = []
    original = vae.decode
    vae.decode = lambda *a, **k: decodes.append(a[0].shape[0]) or original(*a, **k)
    try:
        target = torch.randn(3, 4, 8, 8)
        pred = (target + 0.5 * torch.randn(3, 4, 8, 8)).requires_grad_(True)
        distance = loss(pred, target)
        distance.sum().backward()
        same = loss(target, target.clone())
    finally:
        vae.decode = original
    assert decodes, "pixel LPIPS must decode the latents"
    assert distance.shape == (3,) and bool((distance > 0).all()) and torch.equal(same, torch.zeros(3))
    assert pred.grad is not None and float(pred.grad.abs().sum()) > 0, "no gradient reaches the student's latents"
    # A latent LPIPS file is not a pixel one: refused by name, not run on images.
    with pytest.raises(CheckpointError, match="not a pixel one"):
        load_pixel_trunk_lpips(Path(__file__).parents[2] / "distill" / "lpips" / "weights" / "shapes.safetensors")
