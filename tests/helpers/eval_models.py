"""Tiny networks for the evaluation tests, saved to folders and loaded back as real ones are: a
random CLIP of the real architecture, a TorchScript feature network called as clean-fid calls its
Inception, and an exported student (a perturbed copy of a teacher's UNet, no training)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def build_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """A random CLIPModel (2 layers, width 32, 30 px images) with its processor, saved to `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from d2g.teacher.clip_vocab import write_clip_tokenizer

    folder = Path(folder)
    tok = write_clip_tokenizer(folder, words=["a", "red", "blue", "green", "circle", "square", "cat", "photo"])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=30, patch_size=6),
        projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(folder)
    return folder


class _PooledFeatures(nn.Module):
    """The layout of inception-2015-12-05.pt on a tiny random conv net: `layers` maps [-1, 1] images
    to [N, 16, 1, 1]; forward(x in [0, 255], return_features) resizes and normalises first."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(3, 16, 5, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128).flatten(1)


def build_torchscript_features(path: str | Path, seed: int = 0) -> Path:
    """A TorchScript file standing in for clean-fid's inception-2015-12-05.pt (same call, 16 features)."""
    torch.manual_seed(seed)
    torch.jit.script(_PooledFeatures()).save(str(path))
    return Path(path)


def export_student_copy(teacher: str, folder: str | Path, steps: int = 1, seed: int = 0) -> Path:
    """An exported `steps`-step student of `teacher` whose UNet is the teacher's, perturbed; returns its folder."""
    from d2g.teacher.loading import load_teacher
    from distill.checkpoint import CheckpointStore
    from distill.export import export_student
    from distill.generator import OneStepGenerator
    from distill.train_config import TrainConfig

    folder = Path(folder)
    pipe = load_teacher(teacher)
    student = OneStepGenerator(pipe.unet, pipe.scheduler)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * p.abs().mean() * torch.randn(p.shape, generator=generator))
    config = TrainConfig(data=str(folder / "no-pairs"), teacher=teacher, out=str(folder / "run"),
                         objective="regression", objective_config={"student_steps": steps}, use_ray=False)
    CheckpointStore(str(folder / "run")).save(1, {"generator": student.state_dict()}, {},
                                              {"config": config.model_dump(mode="json"), "step": 1})
    export_student(str(folder / "run"), str(folder / "student"))
    return folder / "student"
