"""FID and CLIP score, as the text-to-image papers report them, on images we generate.

The statistics and the scores come from torchmetrics (`FrechetInceptionDistance` with a feature
network of ours, `CLIPScore` with a CLIP model loaded from a local folder): a maintained library
that needs neither torchvision nor a download (torch-fidelity and clean-fid both pull torchvision,
and clean-fid downloads its Inception on first use). What is ours is the part the papers differ on,
named and recorded with every result:

- the resize/crop protocol (`PROTOCOLS`) applied to generated and reference images alike before
  the feature network: `clean` (clean-fid's: PIL bicubic per channel in float to 299x299),
  `dmd2` (DMD2/GigaGAN's COCO evaluation: centre-crop the long edge to a square, PIL Lanczos to
  256x256, then `clean`), `native` (the feature network's own input size, for the shapes
  evaluator's 32x32 images);
- the feature network (`load_feature_net`): `inception:PATH` is the TorchScript Inception of
  clean-fid and StyleGAN (`inception-2015-12-05.pt`, 2048 pool features, from a local file),
  `shapes` the packaged shapes evaluator (its penultimate features; the FID analogue of the
  shapes world);
- precomputed reference statistics (.npz with `mu`, `sigma`, as clean-fid and the FID papers
  publish them) in place of a reference image folder.

CLIP score: torchmetrics' definition, max(mean over images of 100 * cos(image, caption), 0), with
the CLIP model's own processor (resize the short side to its input size, centre crop). DMD2
reports the raw mean cosine (x 1, not x 100) of OpenCLIP ViT-g/14 on "A photo depicts <caption>"
after its centre crop and Lanczos 256 resize; give `laion/CLIP-ViT-g-14-laion2B-s12B-b42K` as a
local folder for the same network (the prompt prefix is not added here).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

CLEAN_SIZE = 299  # Inception v3's input


class MetricsError(ValueError):
    """A metric cannot be computed as asked; the message names the option or file."""


@dataclass(frozen=True)
class Protocol:
    """How images are cropped and resized before a feature network (recorded with each result).

    Args:
        name: the key in PROTOCOLS.
        square_crop: centre-crop the long edge to a square first.
        pre_resize: resize (PIL Lanczos, 8-bit) to this square size after the crop; None: no.
        final: "clean" (PIL bicubic per channel in float32 to 299x299) or "native" (the network's
            input size, bilinear, only when the size differs).
        description: one line for reports.
    """

    name: str
    square_crop: bool
    pre_resize: int | None
    final: str
    description: str


PROTOCOLS = {
    "clean": Protocol("clean", False, None, "clean", "clean-fid: PIL bicubic per channel in float32 to 299x299, clipped to [0, 255]"),
    "dmd2": Protocol("dmd2", True, 256, "clean", "DMD2/GigaGAN COCO: centre crop to square, PIL Lanczos to "
                     "256x256 (8-bit), then clean-fid's bicubic to 299x299"),
    "native": Protocol("native", False, None, "native", "the feature network's input size (bilinear if different)"),
}


def get_protocol(name: str) -> Protocol:
    """The protocol called `name`; MetricsError naming --protocol otherwise."""
    if name not in PROTOCOLS:
        raise MetricsError(f"--protocol {name!r}: choose one of {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


def crop_and_pre_resize(image: np.ndarray, protocol: Protocol) -> np.ndarray:
    """The 8-bit part of a protocol on one HxWx3 uint8 image: square crop and Lanczos pre-resize."""
    from PIL import Image

    if protocol.square_crop:
        h, w = image.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        image = image[top:top + side, left:left + side]
    if protocol.pre_resize is not None and image.shape[:2] != (protocol.pre_resize, protocol.pre_resize):
        size = (protocol.pre_resize, protocol.pre_resize)
        image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))
    return image


def _clean_resize(image: np.ndarray, size: int) -> np.ndarray:
    """clean-fid's resize: each channel as a float32 PIL image, bicubic, clipped to [0, 255], no 8-bit rounding."""
    from PIL import Image

    channels = [np.asarray(Image.fromarray(image[..., c].astype(np.float32), mode="F")
                           .resize((size, size), Image.Resampling.BICUBIC)) for c in range(3)]
    return np.stack(channels, axis=0).clip(0, 255)


def prepare(images: np.ndarray, protocol: Protocol, native_size: int | None = None) -> torch.Tensor:
    """uint8 images [N, H, W, 3] -> float32 [N, 3, S, S] in [0, 255], as `protocol` says (S: 299 for
    `clean`, `native_size` for `native`)."""
    out = []
    for image in images:
        image = crop_and_pre_resize(np.asarray(image), protocol)
        if protocol.final == "clean":
            out.append(torch.from_numpy(_clean_resize(image, CLEAN_SIZE)))
        else:
            out.append(torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1))
    batch = torch.stack(out)
    if protocol.final == "native" and native_size and batch.shape[-1] != native_size:
        batch = nn.functional.interpolate(batch, size=(native_size, native_size), mode="bilinear", align_corners=False)
    return batch


class ShapesFeatures(nn.Module):
    """The shapes evaluator's penultimate features, from images in [0, 255]: the shapes world's
    Inception. `input_size` and `num_features` tell the caller its input and output sizes.

    Args:
        evaluator: a d2g.shapes.evaluator.Evaluator (default: the packaged one).
    """

    input_size = 32

    def __init__(self, evaluator=None):
        super().__init__()
        from d2g.shapes.evaluator import Evaluator

        self.judge = evaluator or Evaluator.load()
        self.trunk = self.judge.model.trunk
        self.num_features = int(self.judge.config["feature_dim"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, 32, 32] in [0, 255] -> [N, feature_dim]."""
        return self.trunk(x.float() / 127.5 - 1)


class TorchScriptFeatures(nn.Module):
    """The TorchScript Inception of clean-fid and StyleGAN (`inception-2015-12-05.pt`), called as
    clean-fid calls it: images already resized to 299x299 by the protocol, mapped to [-1, 1] as
    (x - 128) / 128, through its `layers` (skipping the file's own internal resize), 2048 features.
    A TorchScript file without `layers` is called as `net(x_0_255, return_features=True)`. Loaded
    from a local file only.

    Args:
        path: the TorchScript file; MetricsError if it is missing.
    """

    input_size = CLEAN_SIZE

    def __init__(self, path: str | Path):
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise MetricsError(f"--feature-net inception:{path}: no such file (the TorchScript "
                               "inception-2015-12-05.pt of clean-fid / StyleGAN; nothing is downloaded)")
        self.net = torch.jit.load(str(path), map_location="cpu").eval()
        self.layers = getattr(self.net, "layers", None)
        self.num_features = int(self.forward(torch.zeros(1, 3, CLEAN_SIZE, CLEAN_SIZE)).shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, 299, 299] in [0, 255] -> [N, D]."""
        if self.layers is not None:
            return self.layers((x.float() - 128) / 128).reshape(x.shape[0], -1)
        return self.net(x.float(), return_features=True)


def load_feature_net(spec: str) -> nn.Module:
    """`shapes` (the packaged shapes evaluator) or `inception:PATH` (a local TorchScript Inception)."""
    if spec == "shapes":
        return ShapesFeatures()
    if spec.startswith("inception:"):
        return TorchScriptFeatures(spec.split(":", 1)[1])
    raise MetricsError(f"--feature-net {spec!r}: give 'shapes' or 'inception:PATH' (a local TorchScript "
                       "inception-2015-12-05.pt)")


class FID:
    """Fréchet distance between generated and reference features: torchmetrics'
    FrechetInceptionDistance over `net`'s features of images prepared by `protocol`.

    Args:
        net: the feature network (ShapesFeatures, TorchScriptFeatures or any module mapping
            [N, 3, S, S] in [0, 255] to [N, D], with `num_features` and `input_size`).
        protocol: the resize/crop protocol for generated and reference images alike.
    """

    def __init__(self, net: nn.Module, protocol: Protocol):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.net, self.protocol = net.eval(), protocol
        self.metric = FrechetInceptionDistance(feature=self.net, reset_real_features=False)

    @torch.no_grad()
    def update(self, images: np.ndarray, real: bool) -> None:
        """Add uint8 images [N, H, W, 3] to the generated (real=False) or reference set."""
        self.metric.update(prepare(images, self.protocol, getattr(self.net, "input_size", None)), real=real)

    def set_reference(self, mu: np.ndarray, sigma: np.ndarray, num: int = 50_000) -> None:
        """Use precomputed reference statistics. The metric keeps sums; any `num` >= 2 gives the
        same mean and covariance back (clean-fid's files do not record theirs)."""
        d = self.metric.real_features_sum.numel()
        mu, sigma = np.asarray(mu, np.float64).reshape(-1), np.asarray(sigma, np.float64)
        if mu.shape != (d,) or sigma.shape != (d, d):
            raise MetricsError(f"reference statistics have mu {mu.shape} and sigma {sigma.shape}; "
                               f"the feature network gives {d} features")
        m, s = torch.from_numpy(mu), torch.from_numpy(sigma)
        self.metric.real_features_sum = m * num
        self.metric.real_features_cov_sum = s * (num - 1) + num * torch.outer(m, m)
        self.metric.real_features_num_samples = torch.tensor(num, dtype=torch.long)

    def statistics(self, real: bool) -> tuple[np.ndarray, np.ndarray, int]:
        """(mu, sigma, n) of the reference (real=True) or generated features seen so far."""
        prefix = "real" if real else "fake"
        n = int(getattr(self.metric, f"{prefix}_features_num_samples"))
        total = getattr(self.metric, f"{prefix}_features_sum")
        mu = total / n
        sigma = (getattr(self.metric, f"{prefix}_features_cov_sum") - n * torch.outer(mu, mu)) / (n - 1)
        return mu.numpy(), sigma.numpy(), n

    def compute(self) -> float:
        """The FID of what was added."""
        return float(self.metric.compute())


def save_statistics(path: str | Path, mu: np.ndarray, sigma: np.ndarray, num: int, **info: str) -> None:
    """Reference statistics as .npz (`mu`, `sigma`, `num` and string notes such as the protocol),
    readable by `load_statistics` and by clean-fid-style tools."""
    np.savez(path, mu=mu, sigma=sigma, num=num, **{k: np.array(v) for k, v in info.items()})


def load_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, num) from an .npz; MetricsError naming the file and the missing key."""
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("mu", "sigma") if k not in data]
            if missing:
                raise MetricsError(f"reference statistics {path}: no {missing[0]!r} array (need mu and sigma)")
            return data["mu"], data["sigma"], int(data["num"]) if "num" in data else 50_000
    except (OSError, ValueError) as err:
        if isinstance(err, MetricsError):
            raise
        raise MetricsError(f"reference statistics {path}: not a readable .npz ({err})") from None


def local_clip_loader(folder: str | Path):
    """A loader for torchmetrics' CLIPScore: (CLIPModel, CLIPProcessor) from a local folder, never a hub."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise MetricsError(f"--clip-model {folder}: not a local CLIP folder (no config.json); save one with "
                           "CLIPModel/CLIPProcessor.save_pretrained or point at the user's hub cache snapshot")

    def load():
        from transformers import CLIPModel, CLIPProcessor

        return _ProjectedFeatures(CLIPModel.from_pretrained(folder).eval()), CLIPProcessor.from_pretrained(folder)

    return load


def _projected(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding;
    # transformers 4 returned the tensor itself. torchmetrics 1.9 expects the tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class _ProjectedFeatures(nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return the projected embeddings as
    tensors, under every transformers version."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.config = clip.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        """The projected image embeddings [N, D]."""
        return _projected(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        """The projected text embeddings [N, D]."""
        return _projected(self.clip.get_text_features(*args, **kwargs))


class CLIPScoreMetric:
    """torchmetrics' CLIPScore with a local CLIP; images go through the protocol's crop and
    pre-resize first (then CLIP's own processor), so `dmd2` matches DMD2's CLIP-score images.

    Args:
        clip_folder: a local folder with a CLIPModel and its CLIPProcessor (save_pretrained layout).
        protocol: the crop/pre-resize applied before CLIP's processor.
    """

    def __init__(self, clip_folder: str | Path, protocol: Protocol):
        from torchmetrics.multimodal.clip_score import CLIPScore

        self.protocol = protocol
        self.metric = CLIPScore(model_name_or_path=local_clip_loader(clip_folder))

    @torch.no_grad()
    def update(self, images: np.ndarray, captions: list[str]) -> None:
        """Add uint8 images [N, H, W, 3] and their captions."""
        batch = [torch.from_numpy(np.array(crop_and_pre_resize(np.asarray(im), self.protocol)))
                 .permute(2, 0, 1) for im in images]
        self.metric.update(batch, list(captions))

    def compute(self) -> float:
        """max(mean of 100 * cos, 0) over what was added."""
        return float(self.metric.compute())


class AttributeAgreement:
    """The shapes world's CLIP-score analogue: the share (in %) of images in which the shapes
    evaluator sees every attribute the caption asked for.

    Args:
        evaluator: a d2g.shapes.evaluator.Evaluator (default: the packaged one).
    """

    def __init__(self, evaluator=None):
        from d2g.shapes.evaluator import Evaluator

        self.judge = evaluator or Evaluator.load()
        self.right = 0
        self.count = 0

    def update(self, images: np.ndarray, captions: list[str]) -> None:
        """Add uint8 images [N, 32, 32, 3] and their (single-shape) shapes captions."""
        attrs = [attributes_of_caption(c) for c in captions]
        acc = self.judge.attribute_accuracy(np.asarray(images), attrs)["all"]
        self.right += round(acc * len(attrs))
        self.count += len(attrs)

    def compute(self) -> float:
        """Percent of images with every attribute right."""
        return 100.0 * self.right / max(self.count, 1)


_CAPTIONS: dict | None = None


def attributes_of_caption(text: str):
    """The attributes a single-shape shapes-world caption asks for; MetricsError for any other text."""
    global _CAPTIONS
    from d2g.shapes import world

    if _CAPTIONS is None:
        _CAPTIONS = {world.caption(a, p): a for a in world.all_combinations() for p in range(len(world.PHRASINGS))}
    if text not in _CAPTIONS:
        raise MetricsError(f"prompt {text!r} is not a single-shape shapes-world caption; the attribute "
                           "agreement needs the world's own captions (e.g. --prompts shapes://train)")
    return _CAPTIONS[text]
