"""LatentLPIPS against a first-principles reference on identical weights, loaded from both official layouts.

The reference network is written here from torchvision's public description of `vgg16_bn`
(conv3x3 -> batch norm -> ReLU blocks, configuration 64, 64, M, 128, 128, M, 256 x3, M, 512 x3, M,
512 x3, M, as one `features` sequence), adapted to latents as the published latent variant is:
the first convolution takes the latent channels and the first three max-pools become identities
(indices kept). Its weights are saved in the official trunk layout (`{enc}_latent_vgg16.pth.tar`)
and the official tuned layout (`{enc}_latest_vgg16_tuned.pth`), loaded by d2g, and d2g's distance
is compared with the formula evaluated op by op in float64 with plain tensor arithmetic:
five taps (the ends of features[0:7], [7:14], [14:24], [24:34], [34:44]), unit normalisation
f / sqrt(sum_c f^2 + 1e-8), squared difference, 1x1 head used as stored, spatial mean, sum over
taps, plus the per-sample mean |x0 - x1| when the L1 term is on. No augmentation.
"""

from __future__ import annotations

import pytest
import torch

from distill.lpips import ELatentLPIPS, LatentLPIPS, LatentVGG16BN, from_official, load_official_trunk

CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
SLICES = ((0, 7), (7, 14), (14, 24), (24, 34), (34, 44))
POOLS_REMOVED = 3
BN_EPS = 1e-5
RTOL = 1e-5


def reference_layers(latent_channels: int, seed: int) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """The features sequence as (kind, tensors) per index, random weights at a stable scale."""
    g = torch.Generator().manual_seed(seed)
    layers: list[tuple[str, dict[str, torch.Tensor]]] = []
    cin, pools = latent_channels, 0
    for item in CFG:
        if item == "M":
            layers.append(("identity" if pools < POOLS_REMOVED else "maxpool", {}))
            pools += 1
            continue
        cout = int(item)
        fan_in = cin * 9
        layers.append(
            (
                "conv",
                {
                    "weight": torch.randn(cout, cin, 3, 3, generator=g) * (2 / fan_in) ** 0.5,
                    "bias": torch.randn(cout, generator=g) * 0.05,
                },
            )
        )
        layers.append(
            (
                "bn",
                {
                    "weight": torch.rand(cout, generator=g) + 0.5,
                    "bias": torch.randn(cout, generator=g) * 0.1,
                    "running_mean": torch.randn(cout, generator=g) * 0.1,
                    "running_var": torch.rand(cout, generator=g) + 0.5,
                    "num_batches_tracked": torch.tensor(5004),
                },
            )
        )
        layers.append(("relu", {}))
        cin = cout
    assert len(layers) == 44
    return layers


def reference_heads(seed: int) -> list[torch.Tensor]:
    # Mostly positive with some negative weights: the published metric uses heads as stored.
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, c, 1, 1, generator=g) - 0.1 for c in (64, 128, 256, 512, 512)]


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """3x3 convolution, zero padding 1, as a sum of shifted products (no conv kernel call)."""
    b, _, h, w = x.shape
    padded = torch.zeros(b, x.shape[1], h + 2, w + 2, dtype=x.dtype)
    padded[:, :, 1:-1, 1:-1] = x
    out = bias[None, :, None, None].expand(b, -1, h, w).clone()
    for dy in range(3):
        for dx in range(3):
            window = padded[:, :, dy : dy + h, dx : dx + w]
            out = out + torch.einsum("bchw,oc->bohw", window, weight[:, :, dy, dx])
    return out


def reference_taps(layers, x: torch.Tensor) -> list[torch.Tensor]:
    taps = []
    for index, (kind, t) in enumerate(layers):
        if kind == "conv":
            x = conv3x3(x, t["weight"].double(), t["bias"].double())
        elif kind == "bn":
            scale = t["weight"].double() / torch.sqrt(t["running_var"].double() + BN_EPS)
            x = (x - t["running_mean"].double()[None, :, None, None]) * scale[None, :, None, None]
            x = x + t["bias"].double()[None, :, None, None]
        elif kind == "relu":
            x = torch.where(x > 0, x, torch.zeros_like(x))
        elif kind == "maxpool":
            b, c, h, w = x.shape
            x = x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(b, c, h // 2, 2, w // 2, 2).amax(dim=(3, 5))
        if any(index == end - 1 for _, end in SLICES):
            taps.append(x)
    return taps


def reference_distance(layers, heads, x0: torch.Tensor, x1: torch.Tensor, l1: bool) -> torch.Tensor:
    x0, x1 = x0.double(), x1.double()
    total = torch.zeros(x0.shape[0], dtype=torch.float64)
    for f0, f1, head in zip(reference_taps(layers, x0), reference_taps(layers, x1), heads, strict=True):
        n0 = f0 / torch.sqrt((f0 * f0).sum(dim=1, keepdim=True) + 1e-8)
        n1 = f1 / torch.sqrt((f1 * f1).sum(dim=1, keepdim=True) + 1e-8)
        weighted = ((n0 - n1) ** 2 * head.double().reshape(1, -1, 1, 1)).sum(dim=1)
        total = total + weighted.mean(dim=(1, 2))
    if l1:
        total = total + (x0 - x1).abs().mean(dim=(1, 2, 3))
    return total


def features_state(layers) -> dict[str, torch.Tensor]:
    return {f"{i}.{name}": v for i, (_, t) in enumerate(layers) for name, v in t.items()}


def write_official_trunk(path, layers) -> None:
    state = {f"module.model.features.{k}": v for k, v in features_state(layers).items()}
    torch.save({"state_dict": state, "best_acc1": torch.tensor(68.26), "epoch": 90}, path)


def write_official_tuned(path, layers, heads) -> None:
    state = {}
    for key, value in features_state(layers).items():
        index = int(key.split(".")[0])
        k = next(n for n, (start, end) in enumerate(SLICES, start=1) if start <= index < end)
        state[f"net.slice{k}.{key}"] = value
    for k, head in enumerate(heads):
        state[f"lin{k}.model.1.weight"] = head
        state[f"lins.{k}.model.1.weight"] = head.clone()
    torch.save(state, path)


def max_relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((ours.double() - ref).abs() / ref.abs()).max())


@pytest.fixture(scope="module", params=[4, 16], ids=["4ch", "16ch"])
def official(request, tmp_path_factory):
    channels = request.param
    layers, heads = reference_layers(channels, seed=channels), reference_heads(seed=100 + channels)
    root = tmp_path_factory.mktemp(f"official{channels}")
    write_official_trunk(root / "enc_latent_vgg16.pth.tar", layers)
    write_official_tuned(root / "enc_latest_vgg16_tuned.pth", layers, heads)
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(3, channels, 16, 24, generator=g)  # non-square: catches height/width mix-ups
    x1 = x0 + 0.5 * torch.randn(3, channels, 16, 24, generator=g)
    x1[2] = torch.randn(channels, 16, 24, generator=g)  # one unrelated pair
    refs = {l1: reference_distance(layers, heads, x0, x1, l1) for l1 in (False, True)}
    return channels, root, layers, heads, x0, x1, refs


@pytest.mark.parametrize("l1", [False, True], ids=["no_l1", "l1"])
def test_tuned_file_distance_matches_the_first_principles_reference(official, l1):
    channels, root, _, _, x0, x1, refs = official
    for ensemble in (False, True):
        kwargs = {"augment": None} if ensemble else {}
        model = from_official(root / "enc_latest_vgg16_tuned.pth", ensemble, l1_weight=float(l1), **kwargs)
        assert model.latent_channels == channels and isinstance(model, ELatentLPIPS) == ensemble
        with torch.no_grad():
            ours = model(x0, x1)
        error = max_relative_error(ours, refs[l1])
        print(f"{channels}ch l1={l1} ensemble={ensemble}: max relative error {error:.2e}")
        assert error <= RTOL, (ours, refs[l1])


@pytest.mark.parametrize("l1", [False, True], ids=["no_l1", "l1"])
def test_trunk_file_distance_matches_the_first_principles_reference(official, l1):
    channels, root, _, heads, x0, x1, refs = official
    model = LatentLPIPS(channels, l1_weight=float(l1)).eval()
    load_official_trunk(root / "enc_latent_vgg16.pth.tar", model.trunk)
    with torch.no_grad():
        for lin, head in zip(model.lins, heads, strict=True):
            lin.model[1].weight.copy_(head)
        ours = model(x0, x1)
    error = max_relative_error(ours, refs[l1])
    print(f"{channels}ch l1={l1} trunk file: max relative error {error:.2e}")
    assert error <= RTOL, (ours, refs[l1])


def test_reference_taps_and_d2g_taps_agree_tap_by_tap(official):
    _, root, layers, _, x0, _, _ = official
    model = from_official(root / "enc_latest_vgg16_tuned.pth", ensemble=False)
    with torch.no_grad():
        ours = model.trunk(x0)
    ref = reference_taps(layers, x0.double())
    assert [tuple(t.shape) for t in ours] == [tuple(t.shape) for t in ref]
    for k, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-4 * float(b.abs().max())), k


def test_tap_sizes_for_a_64x64_latent():
    trunk = LatentVGG16BN(4, width=0.125).eval()
    with torch.no_grad():
        taps = trunk(torch.randn(1, 4, 64, 64))
    assert [tuple(t.shape[-2:]) for t in taps] == [(64, 64), (64, 64), (64, 64), (32, 32), (16, 16)]
    assert [t.shape[1] for t in taps] == list(trunk.tap_channels)
    # The reference network built above from torchvision's description agrees.
    ref = reference_taps(reference_layers(4, seed=0), torch.randn(1, 4, 64, 64, dtype=torch.float64))
    assert [t.shape[-1] for t in ref] == [64, 64, 64, 32, 16]


def test_latents_too_small_for_the_last_tap_are_refused_by_name():
    with pytest.raises(ValueError, match="at least 4x4"):
        LatentVGG16BN(4, width=0.125)(torch.randn(1, 4, 2, 8))


def test_unit_normalisation_puts_1e_8_under_the_square_root():
    from distill.lpips.latent_lpips import unit_normalize

    # Small feature vectors are where the epsilon shows: norm 1e-4, so sqrt(1e-8 + 1e-8), not 1e-4 + 1e-10.
    f = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    f[0, 0] = 1e-4
    assert float(unit_normalize(f)[0, 0]) == pytest.approx(1e-4 / (2e-8) ** 0.5, rel=1e-12)
    assert torch.equal(unit_normalize(torch.zeros(1, 3, 2, 2)), torch.zeros(1, 3, 2, 2))
