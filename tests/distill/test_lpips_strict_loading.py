"""Loading is strict: unknown, missing and mis-shaped keys, and files of the wrong kind, are refused in one line."""

from __future__ import annotations

import pytest
import torch

from distill.losses import make_regression_loss
from distill.lpips import (
    CheckpointError,
    LatentLPIPS,
    LatentVGG16BN,
    from_official,
    load_lpips,
    load_official_trunk,
    load_official_tuned,
    save_lpips,
    save_trunk,
)
from distill.lpips.checkpoints import load_trunk_into, trunk_file_shape
from tests.distill.test_lpips_checkpoints import (
    official_features,
    random_heads,
    slice_of,
    write_trunk_file,
    write_tuned_file,
)


def tuned_state() -> dict[str, torch.Tensor]:
    state = {f"net.slice{slice_of(int(k.split('.')[0]))}.{k}": v for k, v in official_features().items()}
    for k, head in enumerate(random_heads()):
        state[f"lin{k}.model.1.weight"] = head
        state[f"lins.{k}.model.1.weight"] = head.clone()
    return state


def refused(call, path, *keys: str) -> str:
    with pytest.raises(CheckpointError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message, message
    assert str(path) in message, message
    for key in keys:
        assert repr(key) in message, message
    return message


def test_the_unmodified_official_files_load(tmp_path):
    # The baseline for every refusal below: the same files without the defect load.
    write_tuned_file(tmp_path / "tuned.pth", official_features(), random_heads())
    load_official_tuned(tmp_path / "tuned.pth", LatentLPIPS(4))
    write_trunk_file(tmp_path / "trunk.pth.tar", official_features())
    load_official_trunk(tmp_path / "trunk.pth.tar", LatentVGG16BN(4))
    assert trunk_file_shape(tmp_path / "trunk.pth.tar") == (4, 1.0, 3)


@pytest.mark.parametrize("extra", ["foo.bar", "lin5.model.1.weight", "lins.5.model.1.weight", "net.slice1.0.extra",
                                   "net.slice5.44.weight", "module.foo"])  # fmt: skip
def test_tuned_file_with_an_extra_key_is_refused_naming_it(tmp_path, extra):
    state = tuned_state()
    state[extra] = torch.ones(1, 64, 1, 1)
    path = tmp_path / "sd15_latest_vgg16_tuned.pth"
    torch.save(state, path)
    refused(lambda: load_official_tuned(path, LatentLPIPS(4)), path, extra)
    refused(lambda: from_official(path), path, extra)


@pytest.mark.parametrize(
    "missing", ["net.slice4.25.weight", "net.slice5.41.running_mean", "lin0.model.1.weight"]
)
def test_tuned_file_with_a_missing_key_is_refused_naming_it(tmp_path, missing):
    state = tuned_state()
    del state[missing]
    # A head counts as missing only without its duplicate.
    state.pop(missing.replace("lin0.", "lins.0."), None)
    path = tmp_path / "sd15_latest_vgg16_tuned.pth"
    torch.save(state, path)
    refused(lambda: load_official_tuned(path, LatentLPIPS(4)), path, missing)


def test_tuned_file_with_a_mis_shaped_key_is_refused_naming_it(tmp_path):
    state = tuned_state()
    state["lin3.model.1.weight"] = state["lins.3.model.1.weight"] = torch.ones(1, 256, 1, 1)
    path = tmp_path / "tuned.pth"
    torch.save(state, path)
    message = refused(lambda: load_official_tuned(path, LatentLPIPS(4)), path, "lin3.model.1.weight")
    assert "(1, 256, 1, 1)" in message and "(1, 512, 1, 1)" in message


@pytest.mark.parametrize("extra", ["module.model.foo.bar", "foo.bar", "module.model.features.44.weight"])
def test_trunk_file_with_an_extra_key_is_refused_naming_it(tmp_path, extra):
    path = tmp_path / "sd15_latent_vgg16.pth.tar"
    write_trunk_file(path, official_features())
    obj = torch.load(path, weights_only=True)
    obj["state_dict"][extra] = torch.zeros(3)
    torch.save(obj, path)
    refused(lambda: load_official_trunk(path, LatentVGG16BN(4)), path, extra)


def test_trunk_file_with_a_missing_key_is_refused_naming_it(tmp_path):
    features = official_features()
    del features["38.running_var"]
    path = tmp_path / "sd15_latent_vgg16.pth.tar"
    write_trunk_file(path, features, prefix="model.")
    refused(lambda: load_official_trunk(path, LatentVGG16BN(4)), path, "model.features.38.running_var")


def test_a_trunk_file_is_not_taken_for_a_calibrated_one_and_vice_versa(tmp_path):
    trunk = tmp_path / "sd15_latent_vgg16.pth.tar"
    write_trunk_file(trunk, official_features())
    message = refused(lambda: from_official(trunk), trunk)
    assert "is a LatentLPIPS trunk checkpoint, not a calibrated" in message
    refused(lambda: load_official_tuned(trunk, LatentLPIPS(4)), trunk)
    refused(lambda: make_regression_loss("e_latent_lpips", weights=trunk), trunk)

    tuned = tmp_path / "sd15_latest_vgg16_tuned.pth"
    write_tuned_file(tuned, official_features(), random_heads())
    message = refused(lambda: load_official_trunk(tuned, LatentVGG16BN(4)), tuned)
    assert "is a calibrated LatentLPIPS checkpoint" in message and "not a LatentLPIPS trunk" in message


def test_our_files_are_strict_and_know_their_kind(tmp_path):
    torch.manual_seed(0)
    model = LatentLPIPS(4, width=0.125)
    save_trunk(model.trunk, tmp_path / "trunk.safetensors")
    message = refused(lambda: load_lpips(tmp_path / "trunk.safetensors"), tmp_path / "trunk.safetensors")
    assert "is a LatentLPIPS trunk checkpoint, not a calibrated" in message

    from safetensors.torch import load_file, save_file

    save_lpips(model, tmp_path / "lpips.safetensors")
    tensors = load_file(str(tmp_path / "lpips.safetensors"))
    meta = {"format": "d2g-latent-lpips/1", "latent_channels": "4", "width": "0.125"}
    save_file({**tensors, "foo.bar": torch.zeros(1)}, str(tmp_path / "extra.safetensors"), metadata=meta)
    refused(lambda: load_lpips(tmp_path / "extra.safetensors"), tmp_path / "extra.safetensors", "foo.bar")
    del tensors["lins.2.model.1.weight"]
    save_file(tensors, str(tmp_path / "missing.safetensors"), metadata=meta)
    refused(lambda: load_lpips(tmp_path / "missing.safetensors"), tmp_path / "missing.safetensors",
            "lins.2.model.1.weight")  # fmt: skip
    # A calibrated file still serves as a trunk source (`distill lpips calibrate --trunk`).
    trunk = load_trunk_into(tmp_path / "lpips.safetensors", LatentVGG16BN(4, width=0.125))
    assert torch.equal(trunk.features[0].weight, model.trunk.features[0].weight)


def test_not_a_checkpoint_at_all_is_one_line(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"not a safetensors file")
    refused(lambda: load_lpips(path), path)
    pth = tmp_path / "junk.pth"
    torch.save({"something": torch.zeros(1)}, pth)
    refused(lambda: from_official(pth), pth)
