"""A small CNN judge for the shapes world: the analogue of CLIP score, FID and diversity.

- attribute accuracy: one classification head per attribute axis; a generated image is judged
  against the attributes its prompt asked for (how often every attribute is right, and per axis).
- features: the penultimate layer, for a Fréchet distance against real procedural images.
- diversity: mean pairwise feature distance among several samples of one prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from d2g.shapes import world

DEFAULT_PATH = Path(__file__).parent / "weights" / "evaluator"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class ShapesCNN(nn.Module):
    """The judge's network: a conv trunk to penultimate features and one linear head per attribute axis.

    Args:
        widths: channels of the three conv stages.
        feature_dim: size of the features (those the Fréchet distance and diversity use).
        classes: classes per head; default: one head per axis of world.ATTRIBUTES.
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128), feature_dim: int = 128,
                 classes: tuple[int, ...] | None = None):
        super().__init__()
        classes = classes or tuple(len(v) for v in world.ATTRIBUTES.values())
        a, b, c = widths
        self.trunk = nn.Sequential(
            nn.Conv2d(3, a, 3, padding=1), nn.SiLU(),
            nn.Conv2d(a, a, 3, stride=2, padding=1), nn.SiLU(),  # 16x16
            nn.Conv2d(a, b, 3, padding=1), nn.SiLU(),
            nn.Conv2d(b, b, 3, stride=2, padding=1), nn.SiLU(),  # 8x8
            nn.Conv2d(b, c, 3, stride=2, padding=1), nn.SiLU(),  # 4x4
            # Flatten, not global pooling: position is one of the attributes.
            nn.Flatten(), nn.Linear(c * 16, feature_dim), nn.SiLU(),
        )
        self.heads = nn.ModuleList(nn.Linear(feature_dim, n) for n in classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images [N, 3, 32, 32] in [-1, 1] -> (features [N, feature_dim], logits per attribute axis)."""
        features = self.trunk(x)
        return features, [head(features) for head in self.heads]


def as_input(images) -> torch.Tensor:
    """Accept uint8 NHWC arrays (the world), float NHWC arrays in [0, 1] (a pipeline's "np" output),
    PIL images, or float NCHW tensors in [-1, 1]; return float NCHW in [-1, 1]."""
    if isinstance(images, list) and images and hasattr(images[0], "convert"):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            return images.permute(0, 3, 1, 2).float().div(127.5).sub(1)
        return images.float()
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NxHxWx3 images, got shape {images.shape}")
    if images.dtype == np.uint8:
        return world.to_tensor(images)
    return torch.from_numpy(images.astype(np.float32)).permute(0, 3, 1, 2).mul(2).sub(1)


class Evaluator:
    """The trained judge. `Evaluator.load()` reads the packaged weights.

    Args:
        model: the trained ShapesCNN (kept in eval mode, frozen).
        config: its description (widths, feature_dim, attribute vocabulary), saved beside the weights.
    """

    def __init__(self, model: ShapesCNN, config: dict):
        self.model = model.eval().requires_grad_(False)
        self.config = config

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PATH) -> Evaluator:
        """Read an evaluator saved by `save`; refuses one trained on another attribute vocabulary
        than d2g.shapes.world."""
        from safetensors.torch import load_file

        path = Path(path)
        config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
        for f in (config_file, weights_file):
            if not f.exists():
                raise FileNotFoundError(f"evaluator file {f} is missing; train it with "
                                        "`python -m d2g.shapes.train --stage evaluator` (docs/SHAPES.md)")
        config = json.loads(config_file.read_text())
        if config.get("attributes") != {k: list(v) for k, v in world.ATTRIBUTES.items()}:
            raise ValueError(f"evaluator {path} was trained on a different attribute vocabulary "
                             f"({config.get('attributes')}) than d2g.shapes.world")
        model = ShapesCNN(tuple(config["widths"]), config["feature_dim"])
        model.load_state_dict(load_file(weights_file))
        return cls(model, config)

    def save(self, path: str | Path) -> None:
        """Write weights and config to the folder `path` (see `save_evaluator`)."""
        save_evaluator(self.model, self.config, path)

    @torch.no_grad()
    def _run(self, images, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        x = as_input(images)
        feats, preds = [], []
        for chunk in x.split(batch_size):
            f, logits = self.model(chunk)
            feats.append(f)
            preds.append(torch.stack([lg.argmax(1) for lg in logits], dim=1))
        return torch.cat(feats), torch.cat(preds)

    def features(self, images) -> torch.Tensor:
        """Penultimate features (N x feature_dim), the analogue of FID's Inception pool features."""
        return self._run(images)[0]

    def predict(self, images) -> list[world.Attributes]:
        """The attributes the judge sees in each image (any format `as_input` accepts)."""
        preds = self._run(images)[1]
        axes = list(world.ATTRIBUTES.values())
        return [world.Attributes(*(axes[i][int(v)] for i, v in enumerate(row))) for row in preds]

    def attribute_accuracy(self, images, attributes: list[world.Attributes]) -> dict[str, float]:
        """{"all": share with every attribute right, <axis>: share right on that axis}."""
        preds = self._run(images)[1]
        target = world.labels_tensor(attributes)
        if len(target) != len(preds):
            raise ValueError(f"{len(preds)} images but {len(target)} attribute sets")
        right = preds == target
        out = {"all": right.all(1).float().mean().item()}
        out.update({axis: right[:, i].float().mean().item() for i, axis in enumerate(world.ATTRIBUTES)})
        return out


def save_evaluator(model: ShapesCNN, config: dict, path: str | Path) -> None:
    """Write `model`'s weights (safetensors) and `config` (JSON) to the folder `path`, creating it;
    `Evaluator.load` reads them back."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / WEIGHTS_NAME))
    (path / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def frechet_distance(f1: torch.Tensor | np.ndarray, f2: torch.Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (as FID does)."""
    a, b = np.asarray(f1, dtype=np.float64), np.asarray(f2, dtype=np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr(sqrt(s1 s2)) = sum of sqrt eigenvalues of sqrt(s1) s2 sqrt(s1), which is symmetric PSD,
    # so eigh is stable and no scipy is needed.
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def diversity(features: torch.Tensor) -> float:
    """Mean pairwise L2 distance among samples of one prompt, averaged over prompts.

    `features` is P x K x D: K samples for each of P prompts (K >= 2)."""
    if features.ndim != 3 or features.shape[1] < 2:
        raise ValueError(f"diversity needs P x K x D features with K >= 2, got {tuple(features.shape)}")
    d = torch.cdist(features.float(), features.float())  # P x K x K
    k = features.shape[1]
    return (d.sum(dim=(1, 2)) / (k * (k - 1))).mean().item()


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise and blur so the judge is not thrown by a decoder's softness or grain."""
    n = x.shape[0]
    blur = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    use_blur = (torch.rand(n, 1, 1, 1, generator=generator) < 0.3).float()
    x = use_blur * blur + (1 - use_blur) * x
    sigma = torch.rand(n, 1, 1, 1, generator=generator) * 0.1
    return x + sigma * torch.randn(x.shape, generator=generator)
