"""ADD's discriminator as published (Sauer et al. 2023): a frozen vision backbone on decoded pixels,
small trainable heads on several of its layers, conditioned on the text and on an image embedding.

Selected by `add_discriminator: vision` (objectives `add` and `ladd`; off by default). Unlike every
other part of training it decodes latents, with the teacher VAE, on every step: the fakes with
gradients (the generator learns through the decoder and the backbone, both frozen), the reals
without. Images are judged clean (no re-noising, as ADD), resized to the backbone's input size and
normalised with its preprocessor's mean and std.

The backbone and the VAE are held outside the module tree (as ADDDiscriminator holds the teacher
UNet), so `parameters()`, `state_dict()`, optimisers, DDP and checkpoints see only the heads.

Heads (`TokenHead`, ours): per-token logits averaged over every token of a layer (the class token
included), each token's features modulated (FiLM) and projected (projection discriminator) by one
vector: the text summary (distill.conditioning.Conditioning.summary_vector) concatenated with the
pooled embedding of the real image the fake was made for (for a real, its own), as ADD conditions on
the text and image embeddings. The image embedding is the backbone's `pooler_output` (DINOv2's and
CLIP's normalised class token, ViT's pooler), or its first token when it has none.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from d2g.teacher.vae import decode
from distill.conditioning import Conditioning
from distill.discriminators.base import DiscriminatorLogits
from distill.discriminators.r1 import r1_penalty
from distill.discriminators.unet_probe import dummy_conditioning
from distill.objective_config import ADDFamilyConfig

# Used when the backbone folder has no preprocessor_config.json and its config no mean/std.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ADD reads DINOv2 features of several layers; by default this many, evenly spaced.
DEFAULT_LAYER_COUNT = 4


def load_vision_backbone(path: str) -> nn.Module:
    """The transformers vision model saved in local folder `path` (AutoModel.from_pretrained), frozen
    and in eval mode. ValueError naming add_vision_backbone when the folder is missing, cannot be
    loaded, or holds a model that does not take images alone (a text or text-image model)."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"add_vision_backbone: {path} is not a folder (give the local folder of a saved "
                         "transformers vision model)")
    if not (folder / "config.json").is_file():
        raise ValueError(f"add_vision_backbone: {path} has no config.json (not a saved transformers model)")
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"add_vision_backbone: {path} could not be loaded with AutoModel: {first}") from err
    params = inspect.signature(model.forward).parameters
    if "pixel_values" not in params or "input_ids" in params:
        raise ValueError(f"add_vision_backbone: {path} is not a vision model ({type(model).__name__} does not take "
                         "images alone; give e.g. a ViTModel, Dinov2Model or CLIPVisionModel folder)")
    return model.requires_grad_(False).eval()


def pixel_stats(path: str, config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the backbone's inputs are normalised with: its folder's
    preprocessor_config.json, else its config's image_mean/image_std, else ImageNet's."""
    pre = Path(path) / "preprocessor_config.json"
    sources = [json.loads(pre.read_text())] if pre.is_file() else []
    sources.append({"image_mean": getattr(config, "image_mean", None), "image_std": getattr(config, "image_std", None)})
    for source in sources:
        mean, std = source.get("image_mean"), source.get("image_std")
        if mean and std:
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return IMAGENET_MEAN, IMAGENET_STD


def default_layers(n_blocks: int, count: int = DEFAULT_LAYER_COUNT) -> list[int]:
    """`count` hidden-state indices evenly spaced over blocks 1..n_blocks, ending with the last
    (index 0 is the embeddings; with fewer blocks than `count`, every block)."""
    count = max(1, min(count, n_blocks))
    return sorted({max(1, round(n_blocks * (i + 1) / count)) for i in range(count)})


def _input_size(config, size: int | None) -> tuple[int, int]:
    if size is None:
        size = getattr(config, "image_size", None)
    if size is None:
        raise ValueError("add_vision_size: the backbone config has no image_size; set add_vision_size")
    if isinstance(size, (list, tuple)):
        return int(size[0]), int(size[-1])
    return int(size), int(size)


def _tokens(hidden: torch.Tensor) -> torch.Tensor:
    """A hidden state as tokens [B, N, C] (convolutional backbones' maps [B, C, H, W] flattened)."""
    return hidden.flatten(2).transpose(1, 2) if hidden.ndim == 4 else hidden


class TokenHead(nn.Module):
    """Per-token real/fake logits of one backbone layer, averaged over tokens; FiLM by, and a
    projection onto, a conditioning vector (text and image embedding).

    Args:
        channels: features per token.
        cond_dim: size of the conditioning vector.
        hidden: hidden width.
    """

    def __init__(self, channels: int, cond_dim: int, hidden: int = 64):
        super().__init__()
        # Intermediate ViT hidden states are the un-normalised residual stream; normalise first.
        self.norm_in = nn.LayerNorm(channels, elementwise_affine=False)
        self.proj_in = nn.Linear(channels, hidden)
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.cond = nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, 3 * hidden))
        self.out = nn.Linear(hidden, 1)

    def forward(self, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Logits [B] (float32) of tokens [B, N, channels] for conditioning vectors [B, cond_dim]."""
        scale, shift, proj = self.cond(cond).chunk(3, dim=-1)
        h = self.norm(self.proj_in(self.norm_in(tokens)))
        h = F.silu(h * (1 + scale[:, None]) + shift[:, None])
        logits = self.out(h).squeeze(-1) + (h * proj[:, None]).sum(dim=-1) / math.sqrt(h.shape[-1])
        return logits.float().mean(dim=1)


class VisionDiscriminator(nn.Module):
    """ADD's pixel-space discriminator (see the module docstring); implements
    distill.discriminators.base.Discriminator, and its `generator_logits` also takes `real=`, the
    real latents whose image embeddings condition the heads.

    Args:
        backbone: a transformers vision model (frozen here; see load_vision_backbone).
        vae: the teacher's VAE (frozen), to decode latents.
        text_dim: size of the text summary vector.
        layers: hidden-state indices the heads read (None: default_layers).
        size: side the decoded images are resized to (None: the backbone config's image_size).
        head_hidden: hidden width of the heads.
        mean, std: per-channel normalisation of images in [0, 1] (see pixel_stats).
    """

    def __init__(self, backbone: nn.Module, vae: nn.Module, text_dim: int, layers: list[int] | None = None,
                 size: int | None = None, head_hidden: int = 64, *,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD):
        super().__init__()
        # Lists keep the frozen backbone and VAE out of parameters(), buffers() and state_dict().
        self._frozen = [backbone.requires_grad_(False).eval(), vae]
        self.size = _input_size(backbone.config, size)
        self.mean, self.std = tuple(mean), tuple(std)
        n_states, dims, embed_dim = self._probe()
        self.layers = list(layers) if layers is not None else default_layers(n_states - 1)
        bad = [i for i in self.layers if not 0 <= i < n_states]
        if bad:
            raise ValueError(f"add_vision_layers: {bad} out of range; the backbone has hidden states 0..{n_states - 1}")
        self.heads = nn.ModuleDict(
            {f"layer{i}": TokenHead(dims[i], text_dim + embed_dim, head_hidden) for i in self.layers})

    @classmethod
    def from_config(cls, teacher_unet: nn.Module, schedule: nn.Module | None, config: ADDFamilyConfig, *,
                    vae: nn.Module | None = None) -> VisionDiscriminator:
        """The discriminator of an `add`/`ladd` config with `add_discriminator: vision`; `vae` is the
        teacher's. The teacher UNet only gives the text vector's size; `schedule` is not used (no
        re-noising). ValueError naming the bad add_vision_* option."""
        if vae is None:
            raise ValueError("add_discriminator: 'vision' needs the teacher's VAE to decode latents")
        text_dim = dummy_conditioning(teacher_unet).summary_vector().shape[-1]
        backbone = load_vision_backbone(config.add_vision_backbone).to(next(vae.parameters()).device)
        mean, std = pixel_stats(config.add_vision_backbone, backbone.config)
        return cls(backbone, vae, text_dim, config.add_vision_layers, config.add_vision_size, config.head_hidden,
                   mean=mean, std=std)

    @property
    def backbone(self) -> nn.Module:
        """The frozen vision backbone."""
        return self._frozen[0]

    @property
    def vae(self) -> nn.Module:
        """The teacher's VAE that decodes the judged latents."""
        return self._frozen[1]

    @torch.no_grad()
    def _probe(self) -> tuple[int, list[int], int]:
        """Number of hidden states, features per token of each, and the image embedding's size."""
        param = next(self.backbone.parameters())
        channels = int(getattr(self.backbone.config, "num_channels", 3))
        x = torch.zeros(1, channels, *self.size, device=param.device, dtype=param.dtype)
        states, embedding = self._run(x)
        return len(states), [_tokens(h).shape[-1] for h in states], embedding.shape[-1]

    def _run(self, pixel_values: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        out = self.backbone(pixel_values=pixel_values, output_hidden_states=True)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            last = out.last_hidden_state
            pooled = last[:, 0] if last.ndim == 3 else last.mean(dim=(2, 3))
        return tuple(out.hidden_states), pooled.flatten(1)

    def pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> the backbone's input: decoded by the teacher VAE, resized, normalised.
        Differentiable (the generator step's gradient reaches the latents through the decoder)."""
        images = (decode(self.vae, latents).float() + 1) / 2
        images = F.interpolate(images, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        param = next(self.backbone.parameters())
        return ((images - mean) / std).to(param.device, param.dtype)

    def extract(self, latents: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Tokens [B, N, C] of each chosen layer and the image embedding [B, E] of `latents`, in the
        heads' dtype; gradients flow to `latents`, never to the VAE or the backbone."""
        states, embedding = self._run(self.pixels(latents))
        dtype = next(self.heads.parameters()).dtype
        return [_tokens(states[i]).to(dtype) for i in self.layers], embedding.to(dtype)

    def forward(self, features: list[torch.Tensor], text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Per-head logits [B, n_heads] (float32) of the tokens `extract` returned, conditioned on the
        text summary vector [B, D] and the image embedding [B, E] of the matching real images."""
        dtype = next(self.heads.parameters()).dtype
        cond = torch.cat([text.to(dtype), image.to(dtype)], dim=-1)
        return torch.stack([self.heads[f"layer{i}"](f, cond) for i, f in zip(self.layers, features, strict=True)],
                           dim=1)

    # -- the objective's entry points (distill.discriminators.base.Discriminator) ------------------
    def generator_logits(self, fake: torch.Tensor, cond: Conditioning, z: torch.Tensor | None = None, *,
                         real: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, n_heads] of the generator's latents, decoded and judged clean; gradients flow
        to `fake` through the VAE decoder and the backbone. `real`: the real latents the fakes were
        made for (their image embeddings condition the heads; required). `z` is not used."""
        if real is None:
            raise ValueError("VisionDiscriminator.generator_logits needs real=, the real latents the fakes were "
                             "made for (ADD conditions its heads on their image embedding)")
        with torch.no_grad():
            _, image = self.extract(real)
        features, _ = self.extract(fake)
        return self(features, cond.summary_vector(), image)

    def discriminator_logits(self, real: torch.Tensor, fake: torch.Tensor, cond: Conditioning,
                             z: torch.Tensor | None = None, r1: bool = False,
                             forward: Callable | None = None) -> DiscriminatorLogits:
        """Real and fake decoded in one batch without gradients (only the heads train), both
        conditioned on the reals' image embeddings; R1 on the heads' inputs (the reals' tokens).
        The heads run through `forward` (this module or a DDP wrapper of it). `z` is not used."""
        forward = self if forward is None else forward
        b = real.shape[0]
        with torch.no_grad():
            features, image = self.extract(torch.cat([real, fake]))
        real_feats = [f[:b] for f in features]
        if r1:
            # Leaves: the penalty's gradient stops at the tokens, never reaching the backbone.
            real_feats = [f.detach().requires_grad_(True) for f in real_feats]
        feats = [torch.cat([r, f[b:]]) for r, f in zip(real_feats, features, strict=True)]
        text, image = cond.summary_vector(), image[:b]
        logits = forward(feats, torch.cat([text, text]), torch.cat([image, image]))
        real_logits, fake_logits = logits[:b], logits[b:]
        penalty = r1_penalty(real_logits.mean(dim=1), real_feats) if r1 else None
        return DiscriminatorLogits(real_logits, fake_logits, penalty)
