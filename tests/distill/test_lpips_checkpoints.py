"""Official E-LatentLPIPS checkpoint layouts (built here with random weights) load into the right places."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from distill.lpips import CheckpointError, ELatentLPIPS, LatentLPIPS, LatentVGG16BN, load_lpips, save_lpips
from distill.lpips.checkpoints import (
    from_official,
    load_official_trunk,
    load_official_tuned,
    load_trunk_into,
    save_trunk,
)

# torchvision vgg16_bn `features` layout, written out independently of distill.lpips.trunk:
# (conv index, in, out); batch norm sits at conv index + 1. The LPIPS slices are features[0:7],
# [7:14], [14:24], [24:34], [34:44]; each ends with a max-pool (6, 13, 23, 33, 43), parameter-free.
CONVS = [(0, None, 64), (3, 64, 64), (7, 64, 128), (10, 128, 128), (14, 128, 256), (17, 256, 256), (20, 256, 256),
         (24, 256, 512), (27, 512, 512), (30, 512, 512), (34, 512, 512), (37, 512, 512), (40, 512, 512)]  # fmt: skip
SLICES = [(0, 7), (7, 14), (14, 24), (24, 34), (34, 44)]
HEAD_CHANNELS = [64, 128, 256, 512, 512]


def official_features(latent_channels: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for index, cin, cout in CONVS:
        cin = latent_channels if cin is None else cin
        state[f"{index}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * 0.05
        state[f"{index}.bias"] = torch.randn(cout, generator=g)
        bn = index + 1
        state[f"{bn}.weight"] = torch.rand(cout, generator=g) + 0.5
        state[f"{bn}.bias"] = torch.randn(cout, generator=g)
        state[f"{bn}.running_mean"] = torch.randn(cout, generator=g)
        state[f"{bn}.running_var"] = torch.rand(cout, generator=g) + 0.5
        state[f"{bn}.num_batches_tracked"] = torch.tensor(1234)
    return state


def slice_of(index: int) -> int:
    return next(k for k, (start, end) in enumerate(SLICES, start=1) if start <= index < end)


def write_trunk_file(path, features, prefix="module.model."):
    state = {f"{prefix}features.{k}": v for k, v in features.items()}
    state[f"{prefix}classifier.0.weight"] = torch.randn(8, 16)  # torchvision's classifier: ignored
    torch.save({"state_dict": state, "best_acc1": torch.tensor(68.26)}, path)


def write_tuned_file(path, features, heads, prefix=""):
    state = {}
    for key, value in features.items():
        index = int(key.split(".")[0])
        state[f"{prefix}net.slice{slice_of(index)}.{key}"] = value
    for k, head in enumerate(heads):
        state[f"{prefix}lin{k}.model.1.weight"] = head
        state[f"{prefix}lins.{k}.model.1.weight"] = head.clone()
    torch.save(state, path)


def random_heads(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, c, 1, 1, generator=g) for c in HEAD_CHANNELS]


def assert_features_loaded(trunk: LatentVGG16BN, features: dict[str, torch.Tensor]) -> None:
    own = trunk.features.state_dict()
    for key, value in features.items():
        assert torch.equal(own[key], value), key
    # Every learnable tensor of the trunk came from the file.
    assert set(own) == set(features)


@pytest.mark.parametrize("prefix", ["model.", "module.model."])
def test_official_trunk_file_loads_every_tensor(tmp_path, prefix):
    features = official_features()
    path = tmp_path / "sd15_latent_vgg16.pth.tar"
    write_trunk_file(path, features, prefix)
    trunk = load_official_trunk(path, LatentVGG16BN(4))
    assert_features_loaded(trunk, features)


@pytest.mark.parametrize("prefix", ["", "module."])
def test_official_tuned_file_loads_trunk_and_heads(tmp_path, prefix):
    features, heads = official_features(seed=3), random_heads()
    path = tmp_path / "sd15_latest_vgg16_tuned.pth"
    write_tuned_file(path, features, heads, prefix)
    model = load_official_tuned(path, ELatentLPIPS(4))
    assert_features_loaded(model.trunk, features)
    for k, head in enumerate(heads):
        assert torch.equal(model.lins[k].model[1].weight, head)
    # Batch-norm running statistics are used in eval mode: check one directly.
    assert torch.equal(model.trunk.features[41].running_var, features["41.running_var"])


def test_from_official_infers_channels_and_gives_a_working_loss(tmp_path):
    features, heads = official_features(latent_channels=16), random_heads()
    path = tmp_path / "sd3_latest_vgg16_tuned.pth"
    write_tuned_file(path, features, heads)
    model = from_official(path, ensemble=True)
    assert model.latent_channels == 16 and not model.training
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad():
        assert float(model(x, x)) == pytest.approx(0.0, abs=1e-6)
        assert float(model(x, torch.randn(1, 16, 8, 8))) > 0


def test_tuned_file_with_only_lins_duplicates_loads(tmp_path):
    features, heads = official_features(), random_heads()
    state = {f"net.slice{slice_of(int(k.split('.')[0]))}.{k}": v for k, v in features.items()}
    state.update({f"lins.{k}.model.1.weight": h for k, h in enumerate(heads)})
    path = tmp_path / "tuned.pth"
    torch.save(state, path)
    model = load_official_tuned(path, LatentLPIPS(4))
    assert torch.equal(model.lins[4].model[1].weight, heads[4])


def test_missing_key_error_names_the_key(tmp_path):
    features, heads = official_features(), random_heads()
    del features["15.running_var"]
    path = tmp_path / "tuned.pth"
    write_tuned_file(path, features, heads)
    with pytest.raises(CheckpointError, match=r"net\.slice3\.15\.running_var"):
        load_official_tuned(path, LatentLPIPS(4))


def test_missing_head_error_names_the_key(tmp_path):
    features = official_features()
    state = {f"net.slice{slice_of(int(k.split('.')[0]))}.{k}": v for k, v in features.items()}
    state.update({f"lin{k}.model.1.weight": h for k, h in enumerate(random_heads()) if k != 2})
    path = tmp_path / "tuned.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"lin2\.model\.1\.weight"):
        load_official_tuned(path, LatentLPIPS(4))


def test_wrong_shape_error_names_the_key(tmp_path):
    features = official_features(latent_channels=16)  # a FLUX/SD3 trunk offered to a 4-channel model
    path = tmp_path / "flux_latent_vgg16.pth.tar"
    write_trunk_file(path, features)
    with pytest.raises(CheckpointError, match=r"model\.features\.0\.weight.*\(64, 16, 3, 3\)"):
        load_official_trunk(path, LatentVGG16BN(4))


def test_misplaced_slice_is_rejected(tmp_path):
    features = official_features()
    state = {f"net.slice1.{k}": v for k, v in features.items()}  # everything claims slice1
    path = tmp_path / "tuned.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="slice"):
        load_official_tuned(path, LatentLPIPS(4))


@dataclass
class NotATensor:
    payload: str = "arbitrary object"


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"model.features.0.weight": NotATensor()}}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_official_trunk(path, LatentVGG16BN(4))


def test_our_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    model = LatentLPIPS(4, width=0.125)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(0.1, 1.0)
        model.trunk.features[1].running_mean.normal_()
    save_lpips(model, tmp_path / "lpips.safetensors")
    loaded = load_lpips(tmp_path / "lpips.safetensors", ensemble=False)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    save_trunk(model.trunk, tmp_path / "trunk.safetensors")
    trunk = load_trunk_into(tmp_path / "trunk.safetensors", LatentVGG16BN(4, width=0.125))
    assert torch.equal(trunk.features[0].weight, model.trunk.features[0].weight)
    with pytest.raises(CheckpointError, match="features.0.weight"):
        load_trunk_into(tmp_path / "trunk.safetensors", LatentVGG16BN(4, width=0.25))
