"""A periodic preview grid: the student's images, in the steps it is trained for, for fixed noises and prompts.

With evaluation, the only place the trainer decodes latents to pixels.
"""

from __future__ import annotations

import io
import posixpath

import fsspec
import torch

from d2g.teacher.vae import decode, to_unit_range
from distill.generator import seeded_noise
from store import NOISE, PROMPT

PREVIEW_SEED = 1234
PREVIEW_COUNT = 8


def grid_png(images: torch.Tensor, columns: int = 8) -> bytes:
    """images [N, 3, H, W] in [0, 1] -> PNG bytes of one grid."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = -(-n // columns)
    canvas = torch.ones(3, rows * h, columns * w)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[:, r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_contact_sheet(paths: list[str], out: str, columns: int = 8) -> str:
    """The PNGs at `paths` (same size) as one grid PNG at `out` (any fsspec URL), row by row in
    the order given: a sheet of previews to choose from. Returns `out`."""
    import numpy as np
    from PIL import Image

    images = []
    for path in paths:
        with fsspec.open(path, "rb") as f:
            images.append(torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).float() / 255)
    with fsspec.open(out, "wb") as f:
        f.write(grid_png(torch.stack(images), columns=min(columns, len(images))))
    return out


@torch.no_grad()
def write_preview(trainer, step: int) -> str:
    """Write RUN/previews/step-NNNNNNNN.png: the student's (EMA's, if kept) images for the first
    prompts of the training data and fixed noises of the pairs' own latent shape; returns the path."""
    manifest = trainer.dataset.manifest
    first = manifest.shards[0]
    prompts = [trainer.store.get(index=first.first_index + i % first.num_samples, version=manifest.version,
                                 fields=[PROMPT])[PROMPT] for i in range(PREVIEW_COUNT)]
    shape = tuple(manifest.schema.fields[NOISE].shape)
    # Seeded generators for the between-step noise too: a preview never draws from the global RNG,
    # which would change the training run's own randomness (and its exact resume).
    noise, generators = seeded_noise(PREVIEW_SEED, list(range(PREVIEW_COUNT)), shape)
    model = trainer.ema.model if trainer.ema is not None else trainer.generator
    original = trainer.objective.generator
    trainer.objective.generator = model
    try:
        latents = trainer.objective.sample({NOISE: noise, PROMPT: prompts}, generator=generators)
    finally:
        trainer.objective.generator = original
    images = to_unit_range(decode(trainer.pipe.vae, latents))
    fs, root = fsspec.core.url_to_fs(trainer.config.out)
    path = posixpath.join(root, "previews", f"step-{step:08d}.png")
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(grid_png(images.cpu()))
    return path
