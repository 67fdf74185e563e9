"""Training data for a LatentLPIPS of the shapes teacher's latent space (4x8x8 diffusion latents).

Two folders, in exactly the formats `distill/lpips/data.py` reads:

* ``labelled``: world images encoded with the shapes VAE, one ``.npy`` latent [4, 8, 8] per file in
  ``OUT/<class>/``, the input of ``distill lpips train-trunk`` (the paper's ImageNet classification,
  here classifying attributes of the procedural world).
* ``triplets``: 2AFC shards ``OUT/shard-NNNNN.safetensors`` with "ref", "p0", "p1" [N, 4, 8, 8] and
  "judge" [N], the input of ``distill lpips calibrate`` (the paper's BAPPS). ``ref`` is a clean world
  image's latent, ``p0``/``p1`` two distortions of it; the "human" is the shapes evaluator.

With ``--space pixel`` both folders hold the VAE's *decodes* of the same latents instead ([3, 32, 32]
images in [-1, 1], same judgements): the data of the shapes *pixel* LPIPS, a VGG16-BN trunk over
decoded images that stands in for the ImageNet VGG16 LPIPS the `pixel_lpips` loss would otherwise need
(``distill lpips train-trunk --pools-removed 0``; docs/RESULTS.md has the recipe).

Latents follow the diffusion convention the teacher's UNet sees: the posterior mode, shifted and
multiplied by ``vae.config.scaling_factor`` (no sampling, so a latent is a pure function of its image).
Every item is a pure function of (seed, split, index); the output is byte-identical for the same
arguments (and the same batch size, torch build and thread count, which can change float rounding).

    python -m d2g.shapes.lpips_data labelled --out data/shapes-labelled --n 4096 --seed 0
    python -m d2g.shapes.lpips_data triplets --out data/shapes-2afc --n 2048 --seed 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from d2g.shapes import world
from d2g.teacher.vae import decode, encode, shift_and_scale

# Coarser labels than the full attribute combination. The trunk is a feature extractor: a label
# that needs shape, colour and position (or all of them) makes it keep what LPIPS must compare.
LABELS: dict[str, tuple[str, ...]] = {
    "combination": tuple(world.ATTRIBUTES),  # 540 classes (488 in the train split)
    "shape_color": ("shape", "color"),  # 18 classes
    "shape_color_position": ("shape", "color", "position"),  # 90 classes
    **{axis: (axis,) for axis in world.ATTRIBUTES},  # one axis: 2..6 classes
}

# Distortions for the 2AFC pairs. Pixel kinds are applied to the rendered image and re-encoded
# (what a VAE makes of a real perturbation); latent kinds act on the ref latent directly (the
# off-manifold errors a student's latents make). "attribute" is the large, semantic change.
PIXEL_KINDS = ("noise", "blur", "translate", "color", "rerender", "attribute")
LATENT_KINDS = ("latent_noise",)
KINDS = PIXEL_KINDS + LATENT_KINDS
# Strength range per kind, chosen so each kind spans evaluator distances from barely visible to
# about a re-render (feature distances ~3..60 against ~180 between two random world images).
AMOUNTS: dict[str, tuple[float, float]] = {
    "noise": (0.02, 0.4),  # pixel noise std, images in [-1, 1]
    "blur": (0.3, 1.5),  # Gaussian sigma in pixels
    "translate": (1.0, 3.0),  # largest shift in pixels per axis (rounded)
    "color": (0.03, 0.3),  # per-channel gain and offset range
    "rerender": (0.0, 0.0),  # same attributes, new jitter: no strength
    "attribute": (0.0, 0.0),  # one attribute changed: no strength
    "latent_noise": (0.05, 0.8),  # latent noise std (diffusion latents have std ~1)
}
# With 10, mean max(judge, 1 - judge) is 0.85 and half the judgements lie beyond 0.1..0.9 (measured
# on 512 triplets, seed 1): a mostly consistent but not unanimous judge, like BAPPS's human raters,
# so near ties still carry graded information (T=5 gives 0.91, T=20 0.77).
DEFAULT_TEMPERATURE = 10.0  # in evaluator feature-distance units; see `judge_probability`
META_KEY = "d2g_shapes_triplets"
# What a folder holds: the latents, or the VAE's decodes of those same latents (for a pixel LPIPS).
SPACES = ("latent", "pixel")
# Third entry of the per-item seed sequence; d2g.shapes.world uses 0 and 1 for the same item.
DISTORTION_STREAM = 2


# --- the VAE and the evaluator --------------------------------------------------------------------


def load_vae(teacher: str | Path | None = None):
    """The teacher's AutoencoderKL alone (the same weights as `load_pipeline().vae`, without
    loading the UNet and text encoder we do not need)."""
    from diffusers import AutoencoderKL

    from d2g.shapes.sampling import TEACHER_PATH

    path = Path(teacher) if teacher is not None else TEACHER_PATH
    if not (path / "vae" / "config.json").exists():
        raise FileNotFoundError(f"no shapes VAE at {path / 'vae'}; see docs/SHAPES.md to train the teacher")
    return AutoencoderKL.from_pretrained(path, subfolder="vae").eval().requires_grad_(False)


def latent_shape(vae) -> tuple[int, int, int]:
    """(channels, height, width) of the latent `vae` makes of a world image."""
    # Each down block but the last halves the resolution (SD's layout; 32 -> 8 for the shapes VAE).
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    side = world.IMAGE_SIZE // factor
    return int(vae.config.latent_channels), side, side


# --- labelled latents -----------------------------------------------------------------------------


def class_name(attrs: world.Attributes, label: str) -> str:
    """Folder name of `attrs` under `label`, e.g. "circle-red" or "circle-red-small-top_left-black"."""
    return "-".join(getattr(attrs, axis).replace(" ", "_") for axis in LABELS[label])


def num_classes(label: str, split: str) -> int:
    """Classes `label` can produce in `split` (a small N may leave some empty)."""
    return len({class_name(a, label) for a in world.combinations(split)})


def _check_space(space: str) -> None:
    if space not in SPACES:
        raise ValueError(f"unknown --space {space!r}; choose one of {', '.join(SPACES)}")


def _prepare_out(out: Path) -> None:
    # Refuse to mix with an earlier run: stale class folders or shards would silently join the data.
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not empty; choose a new --out")
    out.mkdir(parents=True, exist_ok=True)


def _manifest(out: Path, info: dict) -> None:
    # Outside the class folders / not *.safetensors, so neither loader reads it. Neither timings nor
    # the folder's own path, so two runs with the same arguments stay byte-identical.
    info = {k: v for k, v in info.items() if k != "out"}
    (out / "manifest.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")


def build_labelled(
    out: str | Path,
    n: int,
    seed: int = 0,
    label: str = "shape_color",
    split: str = "train",
    batch_size: int = 256,
    vae=None,
    progress: bool = True,
    space: str = "latent",
) -> dict:
    """Encode world items 0..n-1 of (seed, split) into OUT/<class>/<index>.npy (their decodes with
    space="pixel"); returns a summary."""
    _check_space(space)
    if label not in LABELS:
        raise ValueError(f"unknown --label {label!r}; choose one of {', '.join(LABELS)}")
    if n < 1 or batch_size < 1:
        raise ValueError(f"--n and --batch-size must be >= 1, got {n} and {batch_size}")
    out = Path(out)
    _prepare_out(out)
    vae = vae if vae is not None else load_vae()
    counts: dict[str, int] = {}
    bar = tqdm(total=n, unit="latent", desc="labelled", file=sys.stderr, disable=not progress)
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        images, _, attrs = world.batch(seed, start, count, split)
        latents = encode(vae, world.to_tensor(images))
        if space == "pixel":
            latents = decode(vae, latents)
        latents = latents.numpy().astype(np.float32)
        for offset, (latent, a) in enumerate(zip(latents, attrs, strict=True)):
            name = class_name(a, label)
            (out / name).mkdir(exist_ok=True)
            np.save(out / name / f"{start + offset:07d}.npy", latent)
            counts[name] = counts.get(name, 0) + 1
        bar.update(count)
    bar.close()
    summary = {
        "mode": "labelled",
        "out": str(out),
        "n": n,
        "seed": seed,
        "split": split,
        "label": label,
        "classes": len(counts),
        "possible_classes": num_classes(label, split),
        "min_per_class": min(counts.values()),
        "latent_shape": list(latent_shape(vae)),
        "space": space,
        "item_shape": list(latents.shape[1:]),
        "scaling_factor": shift_and_scale(vae)[1],
    }
    _manifest(out, summary)
    return summary


# --- 2AFC triplets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distortion:
    """One distortion of a 2AFC triplet; applying it is a pure function of these fields.

    Args:
        kind: one of KINDS.
        amount: kind-specific strength, within AMOUNTS[kind].
        seed: the distortion's own randomness: noise pattern, shift, re-render jitter.
    """

    kind: str
    amount: float
    seed: int


def sample_distortion(rng: np.random.Generator) -> Distortion:
    """A uniformly chosen kind, an amount uniform in AMOUNTS[kind] and a seed, all drawn from `rng`."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    low, high = AMOUNTS[kind]
    return Distortion(kind, float(rng.uniform(low, high)), int(rng.integers(2**31)))


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[0]
    # Reflect padding: a zero border would darken the edges, a change the evaluator would score.
    y = F.pad(x[None], (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)[0]


def _translate(x: torch.Tensor, rng: np.random.Generator, most: int) -> torch.Tensor:
    dx, dy = 0, 0
    while dx == 0 and dy == 0:  # a zero shift would be no distortion at all
        dx, dy = (int(v) for v in rng.integers(-most, most + 1, size=2))
    size = x.shape[-1]
    # Replicate padding continues the (uniform) background instead of wrapping the shape around.
    padded = F.pad(x[None], (most, most, most, most), mode="replicate")[0]
    return padded[:, most + dy : most + dy + size, most + dx : most + dx + size]


def _changed_attribute(attrs: world.Attributes, rng: np.random.Generator) -> world.Attributes:
    axes = list(world.ATTRIBUTES)
    axis = axes[int(rng.integers(len(axes)))]
    others = [v for v in world.ATTRIBUTES[axis] if v != getattr(attrs, axis)]
    values = attrs.as_dict() | {axis: others[int(rng.integers(len(others)))]}
    return world.Attributes(**values)


def distort_pixels(d: Distortion, image: torch.Tensor, attrs: world.Attributes) -> torch.Tensor:
    """The pixel image [3, H, W] in [-1, 1] to encode for `d` (the clean image for latent kinds)."""
    rng = np.random.default_rng(d.seed)
    if d.kind == "noise":
        noise = torch.from_numpy(rng.standard_normal(image.shape).astype(np.float32))
        return (image + d.amount * noise).clamp(-1, 1)
    if d.kind == "blur":
        return _gaussian_blur(image, d.amount)
    if d.kind == "translate":
        return _translate(image, rng, round(d.amount))
    if d.kind == "color":
        gain = torch.from_numpy(rng.uniform(-d.amount, d.amount, (3, 1, 1)).astype(np.float32))
        offset = torch.from_numpy(rng.uniform(-d.amount, d.amount, (3, 1, 1)).astype(np.float32))
        return (image * (1 + gain) + offset).clamp(-1, 1)
    if d.kind in ("rerender", "attribute"):
        target = _changed_attribute(attrs, rng) if d.kind == "attribute" else attrs
        return world.to_tensor(world.render(target, rng)[None])[0]
    if d.kind in LATENT_KINDS:
        return image
    raise ValueError(f"unknown distortion kind {d.kind!r}")


def distort_latent(d: Distortion, latent: torch.Tensor) -> torch.Tensor:
    """Latent-space kinds act here, after encoding; pixel kinds pass through."""
    if d.kind != "latent_noise":
        return latent
    # Its own stream (seed + 1): the pixel stage drew nothing from `d.seed` for this kind, but
    # keeping the streams apart means adding a pixel step later cannot change this noise.
    rng = np.random.default_rng(d.seed + 1)
    return latent + d.amount * torch.from_numpy(rng.standard_normal(latent.shape).astype(np.float32))


def judge_probability(d0: torch.Tensor, d1: torch.Tensor, temperature: float) -> torch.Tensor:
    """Soft 2AFC judgement "p1 is closer": 0.5 on a tie, -> 1 as d1 falls below d0.

    `temperature` plays the part of human noise: a distance gap of one temperature gives 73%
    agreement, of three 95%. Too small makes every judgement 0/1 even for near ties; too large
    makes all of them ~0.5 and calibration learns nothing.
    """
    return torch.sigmoid((d0 - d1) / temperature)


@dataclass
class TripletBatch:
    """2AFC triplets with the evaluator's distances, before they become judgements.

    Args:
        ref: latents of the clean images [N, 4, 8, 8].
        p0: latents of each ref's first distortion [N, 4, 8, 8].
        p1: latents of each ref's second distortion [N, 4, 8, 8].
        d0: evaluator feature distance of decoded p0 to decoded ref [N].
        d1: the same for p1 [N].
        kinds: (kind of p0, kind of p1) per triplet.
    """

    ref: torch.Tensor
    p0: torch.Tensor
    p1: torch.Tensor
    d0: torch.Tensor
    d1: torch.Tensor
    kinds: list[tuple[str, str]]


def make_triplet_batch(
    vae, evaluator, seed: int, start: int, count: int, split: str, space: str = "latent"
) -> TripletBatch:
    """Triplets start..start+count-1: one VAE encode, one decode and one evaluator call for all.
    With space="pixel", ref/p0/p1 are the decodes the judge looked at instead of the latents."""
    split_id = world.SPLITS.index(split)
    refs, p0s, p1s, plans = [], [], [], []
    for index in range(start, start + count):
        image_u8, _, attrs = world.item(seed, index, split)
        image = world.to_tensor(image_u8[None])[0]
        rng = np.random.default_rng([seed, split_id, index, DISTORTION_STREAM])
        plan = (sample_distortion(rng), sample_distortion(rng))
        refs.append(image)
        p0s.append(distort_pixels(plan[0], image, attrs))
        p1s.append(distort_pixels(plan[1], image, attrs))
        plans.append(plan)
    latents = encode(vae, torch.stack(refs + p0s + p1s))
    ref, p0, p1 = latents.split(count)
    p0 = torch.stack([distort_latent(plan[0], z) for plan, z in zip(plans, p0, strict=True)])
    p1 = torch.stack([distort_latent(plan[1], z) for plan, z in zip(plans, p1, strict=True)])
    # The judge looks at the *decoded* latents, ref included, not at the pixel images we encoded:
    # LatentLPIPS only ever sees latents, so the target must describe what the latents hold. A pixel
    # change the 8x8 latent cannot represent (fine noise) would otherwise count as a difference the
    # model can never see (an unlearnable target), latent-space kinds have no pixel image at all,
    # and decoding ref too cancels the VAE's own reconstruction error out of d0 and d1.
    decoded = decode(vae, torch.cat([ref, p0, p1]))
    features = evaluator.features(decoded)
    f_ref, f0, f1 = features.split(count)
    if space == "pixel":
        ref, p0, p1 = decoded.split(count)
    d0, d1 = (f0 - f_ref).norm(dim=1), (f1 - f_ref).norm(dim=1)
    kinds = [(a.kind, b.kind) for a, b in plans]
    return TripletBatch(ref, p0.float(), p1.float(), d0, d1, kinds)


def _save_shard(path: Path, parts: list[TripletBatch], info: dict, temperature: float) -> torch.Tensor:
    cat = {k: torch.cat([getattr(p, k) for p in parts]) for k in ("ref", "p0", "p1", "d0", "d1")}
    judge = judge_probability(cat["d0"], cat["d1"], temperature)
    kinds = [k for p in parts for k in p.kinds]
    meta = info | {
        "kind0": [k[0] for k in kinds],
        "kind1": [k[1] for k in kinds],
        # The raw distances, so a different temperature can be applied without re-encoding.
        "d0": [round(float(v), 4) for v in cat["d0"]],
        "d1": [round(float(v), 4) for v in cat["d1"]],
    }
    tensors = {k: cat[k].contiguous() for k in ("ref", "p0", "p1")} | {"judge": judge.contiguous()}
    # One metadata key: safetensors does not promise an order for several, and the output must be
    # byte-identical from run to run.
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(meta, sort_keys=True)})
    return judge


def build_triplets(
    out: str | Path,
    n: int,
    shard_size: int = 512,
    seed: int = 1,
    temperature: float = DEFAULT_TEMPERATURE,
    split: str = "train",
    batch_size: int = 128,
    vae=None,
    evaluator=None,
    progress: bool = True,
    space: str = "latent",
) -> dict:
    """Write ceil(n / shard_size) shards of 2AFC triplets into OUT (the latents' decodes with
    space="pixel"); returns a summary."""
    _check_space(space)
    if n < 1 or shard_size < 1 or batch_size < 1:
        raise ValueError(
            f"--n, --shard-size and --batch-size must be >= 1, got {n}, {shard_size}, {batch_size}"
        )
    if not temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {temperature}")
    out = Path(out)
    _prepare_out(out)
    vae = vae if vae is not None else load_vae()
    if evaluator is None:
        from d2g.shapes.evaluator import Evaluator

        evaluator = Evaluator.load()
    judges, gaps, kind_counts = [], [], {k: 0 for k in KINDS}
    bar = tqdm(total=n, unit="triplet", desc="triplets", file=sys.stderr, disable=not progress)
    for shard, shard_start in enumerate(range(0, n, shard_size)):
        shard_end = min(n, shard_start + shard_size)
        parts = []
        for start in range(shard_start, shard_end, batch_size):
            count = min(batch_size, shard_end - start)
            parts.append(make_triplet_batch(vae, evaluator, seed, start, count, split, space))
            bar.update(count)
        info = {"seed": seed, "split": split, "start": shard_start, "temperature": temperature, "space": space}
        judges.append(_save_shard(out / f"shard-{shard:05d}.safetensors", parts, info, temperature))
        gaps += [(p.d0 - p.d1).abs() for p in parts]
        for p in parts:
            for a, b in p.kinds:
                kind_counts[a] += 1
                kind_counts[b] += 1
    bar.close()
    judge, gap = torch.cat(judges), torch.cat(gaps)
    summary = {
        "mode": "triplets",
        "out": str(out),
        "n": n,
        "shards": len(judges),
        "shard_size": shard_size,
        "seed": seed,
        "split": split,
        "temperature": temperature,
        "space": space,
        "judge_mean": round(float(judge.mean()), 4),
        "judge_decisive": round(float(((judge < 0.1) | (judge > 0.9)).float().mean()), 4),
        "median_distance_gap": round(float(gap.median()), 3),
        "kinds": kind_counts,
    }
    _manifest(out, summary)
    return summary


# --- command line ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m d2g.shapes.lpips_data",
        description="Build LatentLPIPS training data for the shapes teacher's latent space (4x8x8 "
        "diffusion latents): labelled latents for `distill lpips train-trunk` and 2AFC triplet shards "
        "for `distill lpips calibrate` (with --space pixel: the VAE's decodes of the same items, for a pixel "
        "LPIPS trained with `train-trunk --pools-removed 0`). Deterministic from --seed. Use different seeds for the two "
        "modes (and for a held-out set) so that they do not share world images.",
    )
    sub = parser.add_subparsers(dest="mode", metavar="MODE", required=True)

    def common(p: argparse.ArgumentParser, seed: int, batch: int) -> None:
        p.add_argument("--out", required=True, help="output folder (created; must be new or empty)")
        p.add_argument("--n", type=int, required=True, help="number of latents / triplets")
        p.add_argument(
            "--seed", type=int, default=seed, help="world and distortion seed (default %(default)s)"
        )
        p.add_argument(
            "--split", choices=world.SPLITS, default="train",
            help="world split: attribute combinations the teacher trained on, or held out (default %(default)s)",
        )  # fmt: skip
        p.add_argument(
            "--batch-size", type=int, default=batch,
            help="items per VAE/evaluator call (default %(default)s); part of what makes output byte-identical",
        )  # fmt: skip
        p.add_argument("--teacher", default=None, help="teacher pipeline folder (default: the packaged one)")
        p.add_argument(
            "--space", choices=SPACES, default="latent",
            help="write the latents, or the VAE's decodes of the same latents ([3, 32, 32] in [-1, 1]) for a "
            "pixel LPIPS (default %(default)s)",
        )  # fmt: skip
        p.add_argument("--json", action="store_true", help="print the summary as one JSON line")
        p.add_argument("--no-progress", action="store_true", help="no tqdm bar on stderr")

    lab = sub.add_parser(
        "labelled",
        help="labelled latents for `distill lpips train-trunk`",
        description="Encode N world images (posterior mode x scaling factor) to OUT/<class>/<index>.npy, "
        "one float32 latent [4, 8, 8] per file; class folders follow --label.",
    )
    common(lab, seed=0, batch=256)
    lab.add_argument(
        "--label", choices=list(LABELS), default="shape_color",
        help="class of a latent: 'combination' (all five attributes, 488 train classes), 'shape_color' "
        "(18), 'shape_color_position' (90) or a single attribute (default %(default)s)",
    )  # fmt: skip

    tri = sub.add_parser(
        "triplets",
        help="2AFC triplet shards for `distill lpips calibrate`",
        description="Write OUT/shard-NNNNN.safetensors with 'ref', 'p0', 'p1' [N, 4, 8, 8] and 'judge' [N]. "
        "ref is a world image's latent; p0/p1 are distortions of it (pixel noise, blur, translation, colour "
        f"jitter, re-rendering, one attribute changed, latent noise: {', '.join(KINDS)}). judge = "
        "sigmoid((d0 - d1) / T) with d the shapes evaluator's feature distance between the decoded latents.",
    )
    common(tri, seed=1, batch=128)
    tri.add_argument("--shard-size", type=int, default=512, help="triplets per shard (default %(default)s)")
    tri.add_argument(
        "--temperature", type=float, default=DEFAULT_TEMPERATURE,
        help="T of the soft judgement, in evaluator feature-distance units (default %(default)s; "
        "random world images are ~180 apart, a re-render ~35, median |d0 - d1| ~23)",
    )  # fmt: skip
    tri.add_argument("--evaluator", default=None, help="evaluator folder (default: the packaged one)")
    return parser


def _describe(s: dict, seconds: float) -> str:
    if s["mode"] == "labelled":
        return (
            f"wrote {s['n']} {'images' if s['space'] == 'pixel' else 'latents'} {s['item_shape']} in {s['classes']}/{s['possible_classes']} "
            f"'{s['label']}' classes to {s['out']} (seed {s['seed']}) in {seconds:.1f}s"
        )
    return (
        f"wrote {s['n']} triplets in {s['shards']} shards to {s['out']} (seed {s['seed']}, T {s['temperature']}, "
        f"judge mean {s['judge_mean']}, decisive {s['judge_decisive']}) in {seconds:.1f}s"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m d2g.shapes.lpips_data labelled|triplets`: build one folder and print its summary;
    returns the exit code (2 for a bad argument or a non-empty --out)."""
    args = _parser().parse_args(argv)
    started = time.time()
    try:
        vae = load_vae(args.teacher)
        if args.mode == "labelled":
            summary = build_labelled(
                args.out, args.n, args.seed, args.label, args.split, args.batch_size, vae,
                progress=not args.no_progress, space=args.space,
            )  # fmt: skip
        else:
            from d2g.shapes.evaluator import DEFAULT_PATH, Evaluator

            evaluator = Evaluator.load(args.evaluator or DEFAULT_PATH)
            summary = build_triplets(
                args.out, args.n, args.shard_size, args.seed, args.temperature, args.split,
                args.batch_size, vae, evaluator, progress=not args.no_progress, space=args.space,
            )  # fmt: skip
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    seconds = time.time() - started
    print(json.dumps(summary | {"seconds": round(seconds, 1)}) if args.json else _describe(summary, seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
