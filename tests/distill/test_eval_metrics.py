"""FID and CLIP score of distill.eval_metrics against the library and independent hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from distill.eval_metrics import (
    FID,
    PROTOCOLS,
    CLIPScoreMetric,
    MetricsError,
    TorchScriptFeatures,
    load_statistics,
    prepare,
    save_statistics,
)


class PixelMeans(nn.Module):
    """A feature 'network' whose features are known: the mean of each channel over a 4x4 grid (48 numbers)."""

    input_size = 8
    num_features = 48

    def forward(self, x):
        return nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1)


def _closed_form(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + tr(Sa + Sb - 2 (Sa Sb)^1/2), with the square root from an eigendecomposition
    of the symmetric Sa^1/2 Sb Sa^1/2 (numpy only; independent of torchmetrics' eigvals of Sa Sb)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(sa)
    root = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ sb @ root), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * cross)


class Identity(nn.Module):
    """Features = the input itself (flattened), to feed chosen Gaussian features through the metric."""

    def __init__(self, d):
        super().__init__()
        self.num_features = d

    def forward(self, x):
        return x.flatten(1).double()


def test_fid_equals_closed_form_on_gaussian_features_and_the_library():
    from torchmetrics.image.fid import FrechetInceptionDistance

    rng = np.random.default_rng(0)
    d = 6
    a = rng.normal(0, 1, (400, d)) @ rng.normal(0, 1, (d, d))
    b = rng.normal(0.5, 2, (300, d))
    fid = FID(Identity(d), PROTOCOLS["native"])
    fid.metric.update(torch.from_numpy(a), real=True)
    fid.metric.update(torch.from_numpy(b), real=False)
    assert fid.compute() == pytest.approx(_closed_form(b, a), rel=1e-6)
    # Diagonal population covariances: FID = |mu1-mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2, within sampling error.
    x = rng.normal(0, 1, (20000, 3)) * np.array([1.0, 2.0, 3.0])
    y = rng.normal(1, 1, (20000, 3)) * np.array([2.0, 2.0, 1.0]) + np.array([1.0, 0.0, 0.0])
    fid2 = FID(Identity(3), PROTOCOLS["native"])
    fid2.metric.update(torch.from_numpy(x), real=True)
    fid2.metric.update(torch.from_numpy(y), real=False)
    mean_y = np.array([1.0, 0, 0]) + np.array([2.0, 2.0, 1.0])
    expected = (mean_y ** 2).sum() + ((np.array([1, 2, 3.0]) - np.array([2, 2, 1.0])) ** 2).sum()
    assert fid2.compute() == pytest.approx(expected, abs=0.15)
    # Images through our protocol and feature network == the library fed the same features directly.
    images_a = rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8)
    images_b = np.clip(images_a.astype(int) + rng.integers(-60, 60, images_a.shape), 0, 255).astype(np.uint8)
    ours = FID(PixelMeans(), PROTOCOLS["native"])
    ours.update(images_a, real=True)
    ours.update(images_b, real=False)
    library = FrechetInceptionDistance(feature=PixelMeans())
    to_nchw = lambda im: nn.functional.interpolate(torch.from_numpy(im).permute(0, 3, 1, 2).float(), size=(8, 8),  # noqa: E731
                                                    mode="bilinear", align_corners=False)
    library.update(to_nchw(images_a), real=True)
    library.update(to_nchw(images_b), real=False)
    assert ours.compute() == pytest.approx(float(library.compute()), rel=1e-6)
    feats = lambda im: PixelMeans()(to_nchw(im)).double().numpy()  # noqa: E731
    assert ours.compute() == pytest.approx(_closed_form(feats(images_b), feats(images_a)), rel=1e-5)


def test_precomputed_statistics_give_the_same_fid(tmp_path):
    rng = np.random.default_rng(1)
    real = rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8)
    fake = rng.integers(0, 200, (30, 8, 8, 3), dtype=np.uint8)
    direct = FID(PixelMeans(), PROTOCOLS["native"])
    direct.update(real, real=True)
    direct.update(fake, real=False)
    mu, sigma, n = direct.statistics(real=True)
    save_statistics(tmp_path / "ref.npz", mu, sigma, n, protocol="native")
    from_file = FID(PixelMeans(), PROTOCOLS["native"])
    from_file.set_reference(*load_statistics(tmp_path / "ref.npz"))
    from_file.update(fake, real=False)
    assert from_file.compute() == pytest.approx(direct.compute(), rel=1e-9)
    np.savez(tmp_path / "bad.npz", mu=mu)
    with pytest.raises(MetricsError, match="bad.npz: no 'sigma'"):
        load_statistics(tmp_path / "bad.npz")
    with pytest.raises(MetricsError, match="feature network gives 48"):
        from_file.set_reference(mu[:5], sigma[:5, :5])


def test_protocols_resize_as_named():
    from PIL import Image

    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)  # not square
    clean = prepare(image[None], PROTOCOLS["clean"])
    assert clean.shape == (1, 3, 299, 299)
    # clean: each channel as a float image, bicubic (clipped to [0, 255]), no rounding to 8 bits.
    red = np.asarray(Image.fromarray(image[..., 0].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
    assert np.allclose(clean[0, 0].numpy(), red.clip(0, 255)) and (red > 255).any()  # bicubic overshoots
    dmd2 = prepare(image[None], PROTOCOLS["dmd2"])
    square = Image.fromarray(image[:, 12:52]).resize((256, 256), Image.LANCZOS)
    green = np.asarray(Image.fromarray(np.asarray(square)[..., 1].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
    assert np.allclose(dmd2[0, 1].numpy(), green.clip(0, 255))


def test_torchscript_inception_is_called_as_clean_fid_calls_it(tmp_path):
    from tests.helpers.eval_models import build_torchscript_features

    build_torchscript_features(tmp_path / "inception.pt")
    net = TorchScriptFeatures(tmp_path / "inception.pt")
    assert net.num_features == 16
    x = torch.rand(2, 3, 299, 299) * 255
    raw = torch.jit.load(str(tmp_path / "inception.pt"))
    # Its `layers` on (x - 128) / 128, as clean-fid does for images it has resized itself.
    assert torch.allclose(net(x), raw.layers((x - 128) / 128).flatten(1))

    class NoLayers(nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return x.mean(dim=(2, 3)) if return_features else x.sum()

    torch.jit.script(NoLayers()).save(str(tmp_path / "plain.pt"))
    assert torch.equal(TorchScriptFeatures(tmp_path / "plain.pt")(torch.full((2, 3, 299, 299), 7.0)),
                       torch.full((2, 3), 7.0))
    with pytest.raises(MetricsError, match="no such file"):
        TorchScriptFeatures(tmp_path / "missing.pt")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tests.helpers.eval_models import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_clip_score_equals_a_hand_computation(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (5, 40, 40, 3), dtype=np.uint8)
    captions = ["a red circle", "a blue square", "a photo", "red", "a blue circle"]
    metric = CLIPScoreMetric(tiny_clip, PROTOCOLS["clean"])
    metric.update(images[:3], captions[:3])
    metric.update(images[3:], captions[3:])
    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        text = processor(text=captions, return_tensors="pt", padding=True)
        # CLIP's projections of its pooled outputs, written out: the embeddings CLIP score compares.
        img = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        txt = model.text_projection(model.text_model(input_ids=text["input_ids"],
                                                     attention_mask=text["attention_mask"]).pooler_output)
    img, txt = img.numpy().astype(np.float64), txt.numpy().astype(np.float64)
    cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    assert metric.compute() == pytest.approx(max(100 * cos.mean(), 0.0), abs=1e-3)
    with pytest.raises(MetricsError, match="not a local CLIP folder"):
        CLIPScoreMetric(tiny_clip / "nothing", PROTOCOLS["clean"])
