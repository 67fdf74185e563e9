"""Preview, then upscale: a one-step student makes many small previews at interactive speed; the
chosen ones go through a separate diffusers image upscaler (Diffusion2GAN's workflow, with the
stock x4 upscaler or latent upscaler in place of its unpublished GigaGAN upsampler).

Each preview's prompt, seed and noise index come from its PNG text chunks (`distill generate`
writes them), so an upscale needs no bookkeeping, and the upscaler's own noise is drawn from the
preview's sample seed (d2g.teacher.noise.sample_seed(seed, noise_index)): upscaling the same
preview again gives the same image.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch

from distill.export import save_pngs


class UpscaleError(ValueError):
    """An upscale cannot run as asked; the message names the option or file."""


def read_preview(path: str | Path) -> dict:
    """The text chunks of a preview PNG (prompt, seed, noise_index, steps, model...); UpscaleError
    naming the file if it has no prompt (not made by `distill generate` / `distill eval`)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", {}))
    except (FileNotFoundError, OSError) as err:
        raise UpscaleError(f"preview {path}: cannot read it as an image ({err})") from None
    if not text.get("prompt"):
        raise UpscaleError(f"preview {path}: no 'prompt' in its PNG text chunks; give --prompt, or a PNG made by "
                           "distill generate")
    return text


def pick_previews(folder: str | Path, pick: list[int]) -> list[Path]:
    """The PNGs at positions `pick` in `folder`'s name order (image-007.png is 7 in a folder that
    `distill generate` filled); UpscaleError naming --pick when a position does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UpscaleError(f"--images {folder}: not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    bad = [i for i in pick if not 0 <= i < len(files)]
    if bad:
        raise UpscaleError(f"--pick {bad[0]}: {folder} has {len(files)} PNGs (positions 0 to {len(files) - 1})")
    return [files[i] for i in pick]


def load_upscaler(model: str, device: str = "cpu"):
    """A diffusers image upscaler pipeline (StableDiffusionUpscalePipeline,
    StableDiffusionLatentUpscalePipeline, ...) from a local folder or the user's hub cache; UpscaleError
    if the pipeline takes no `image`."""
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(model)
    except (OSError, ValueError) as err:
        raise UpscaleError(f"--model {model}: not a diffusers pipeline folder ({str(err).splitlines()[0]})") from None
    if "image" not in inspect.signature(pipe.__call__).parameters:
        raise UpscaleError(f"--model {model}: {type(pipe).__name__} is not an image upscaler (its __call__ takes no image)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


@torch.no_grad()
def upscale_previews(model: str, previews: list[str | Path], out: str, steps: int = 20, guidance: float | None = None,
                     noise_level: int | None = None, seed: int | None = None, prompt: str | None = None,
                     device: str = "cpu") -> list[str]:
    """Upscale each preview with the upscaler at `model`, prompted with the preview's own prompt
    (or `prompt`), its noise from the preview's sample seed (or `seed`); PNGs in `out` named after
    the preview (never overwriting), with the preview's metadata and the upscaler's settings.
    `guidance` and `noise_level` default to the pipeline's own. Returns the paths."""
    from PIL import Image

    from d2g.teacher.noise import sample_seed

    pipe = load_upscaler(model, device)
    accepted = inspect.signature(pipe.__call__).parameters
    paths = []
    for preview in previews:
        meta = read_preview(preview) if prompt is None else {"prompt": prompt}
        text = prompt or meta["prompt"]
        noise_seed = seed if seed is not None else sample_seed(int(meta.get("seed", 0)), int(meta.get("noise_index", 0)))
        kwargs = {"num_inference_steps": steps, "generator": torch.Generator().manual_seed(noise_seed),
                  "output_type": "np"}
        if guidance is not None:
            kwargs["guidance_scale"] = guidance
        if noise_level is not None and "noise_level" in accepted:
            kwargs["noise_level"] = noise_level
        image = Image.open(preview).convert("RGB")
        result = pipe(prompt=text, image=image, **kwargs).images[0]
        tensor = torch.from_numpy(result).permute(2, 0, 1)[None].clamp(0, 1)
        info = {**{k: v for k, v in meta.items() if k != "prompt"}, "prompt": text, "source": os.path.abspath(preview),
                "upscaler": os.path.abspath(model) if os.path.isdir(model) else model, "upscaler_steps": steps,
                "upscaler_seed": noise_seed, "upscaler_pipeline": type(pipe).__name__}
        if guidance is not None:
            info["upscaler_guidance"] = guidance
        if "noise_level" in kwargs:
            info["upscaler_noise_level"] = noise_level
        paths += save_pngs(tensor, out, stem=f"{Path(preview).stem}-up", metadata=[info])
    return paths


def register(sub) -> None:
    """Add the `upscale` subcommand to `sub` (an argparse subparsers object)."""
    from store import console

    parser = sub.add_parser(
        "upscale", help="upscale chosen previews with a diffusers image upscaler",
        description="Upscale chosen previews (PNGs of distill generate) with any diffusers image upscaler pipeline "
        "(stabilityai/stable-diffusion-x4-upscaler, the latent upscaler, a local folder): each is prompted with "
        "the prompt in its PNG and draws its noise from the preview's seed, so the same preview upscales to the "
        "same image. Outputs are never overwritten. E.g. distill upscale --model ./sd-x4-upscaler --images previews "
        "--pick 0,3,7 --out upscaled (README.md, Preview, then upscale).")
    parser.add_argument("--model", required=True, help="upscaler pipeline folder (or a hub id in the local cache)")
    parser.add_argument("--images", required=True, help="folder of previews (distill generate --out)")
    parser.add_argument("--pick", required=True, help="comma-separated positions in the folder's name order, e.g. 0,3,7")
    parser.add_argument("--out", default="upscaled", help="output folder")
    parser.add_argument("--steps", type=int, default=20, help="upscaler sampling steps")
    parser.add_argument("--guidance", type=float, help="upscaler guidance scale (default: the pipeline's)")
    parser.add_argument("--noise-level", type=int, help="x4 upscaler's noise level (default: the pipeline's, 20)")
    parser.add_argument("--seed", type=int, help="upscaler noise seed (default: from each preview's seed and index)")
    parser.add_argument("--prompt", help="prompt for every pick (default: each preview's own)")
    parser.add_argument("--device", default="cpu", help="torch device")
    console.add_json_flag(parser)
    parser.set_defaults(func=_cmd_upscale)


def _cmd_upscale(args) -> int:
    import sys

    from store import console

    try:
        pick = [int(p) for p in args.pick.split(",") if p.strip()]
    except ValueError:
        raise UpscaleError(f"--pick {args.pick!r}: give comma-separated integers, e.g. 0,3,7") from None
    previews = pick_previews(args.images, pick)
    paths = upscale_previews(args.model, previews, args.out, args.steps, args.guidance, args.noise_level, args.seed,
                             args.prompt, args.device)
    if args.json:
        console.print_json({"images": paths, "sources": [str(p) for p in previews]})
    else:
        print("\n".join(paths))
    print(f"distill: upscaled {len(paths)} previews of {args.images} with {args.model} into {args.out}", file=sys.stderr)
    return 0
