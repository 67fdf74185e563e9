"""2AFC agreement of the shapes LPIPS metrics with their judge, on held-out triplets.

    .venv/bin/python bench/lpips_2afc.py --latent-val runs/shapes-lpips/2afc-val \
        --pixel-val runs/shapes-pixel-lpips/2afc-val [--json]

The two folders are `python -m d2g.shapes.lpips_data triplets` output with the same --seed, --n and
--split, once per --space: the same triplets and judgements, as latents and as their decodes. Rows:
the judge's own consistency (the ceiling), the packaged shapes LatentLPIPS with and without its
latent L1 term, plain latent L2, an untrained latent trunk (width 0.25), the packaged shapes pixel
LPIPS, plain pixel L2 and an untrained pixel trunk (width 0.25). 2AFC as in BAPPS: a metric is
credited the judge's fraction when it prefers p1, one minus it when it prefers p0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.lpips.calibrate import two_afc_score  # noqa: E402
from distill.lpips.data import Triplets, load_triplets  # noqa: E402

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def l2(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """Mean squared difference per sample."""
    return ((x0 - x1) ** 2).flatten(1).mean(1)


def score(distance: Distance, data: Triplets) -> float:
    """2AFC agreement of `distance` with the triplets' judge."""
    with torch.no_grad():
        return two_afc_score(distance(data.ref, data.p0), distance(data.ref, data.p1), data.judge)


def untrained(channels: int, pools_removed: int) -> Distance:
    """An LPIPS with a random trunk of width 0.25 and equal head weights (seed 0)."""
    from distill.lpips.latent_lpips import LatentLPIPS

    torch.manual_seed(0)
    return LatentLPIPS(channels, 0.25, l1_weight=0.0, pools_removed=pools_removed).eval()


def rows(latent: Triplets, pixel: Triplets | None) -> list[tuple[str, float]]:
    """(metric, 2AFC) for every metric whose triplets were given."""
    from distill.lpips.checkpoints import load_lpips
    from distill.lpips.pixel import load_pixel_trunk_lpips
    from distill.objective_config import PACKAGED_LPIPS, PACKAGED_PIXEL_LPIPS

    shapes = load_lpips(PACKAGED_LPIPS["shapes"], ensemble=False)
    ceiling = float(torch.maximum(latent.judge, 1 - latent.judge).mean())
    out = [
        ("the judge itself (the ceiling)", ceiling),
        ("shapes LatentLPIPS, as used (with its latent L1 term)", score(shapes, latent)),
        ("shapes LatentLPIPS without the L1 term", score(shapes.feature_distance, latent)),
        ("plain latent L2", score(l2, latent)),
        ("untrained latent trunk, width 0.25", score(untrained(latent.ref.shape[1], 3), latent)),
    ]
    if pixel is not None:
        if not torch.equal(pixel.judge, latent.judge):
            raise SystemExit("--pixel-val and --latent-val hold different judgements: build both with the same "
                             "--seed, --n and --split (only --space differs)")
        out += [
            ("shapes pixel LPIPS (VGG16-BN trunk on decodes)",
             score(load_pixel_trunk_lpips(PACKAGED_PIXEL_LPIPS["shapes"]), pixel)),
            ("plain pixel L2 (of the decodes)", score(l2, pixel)),
            ("untrained pixel trunk, width 0.25", score(untrained(3, 0), pixel)),
        ]  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent-val", required=True, help="held-out latent triplets (lpips_data triplets)")
    ap.add_argument("--pixel-val", default=None, help="the same triplets with --space pixel")
    ap.add_argument("--json", action="store_true", help="one JSON object instead of a markdown table")
    args = ap.parse_args(argv)
    try:
        latent = load_triplets(args.latent_val)
        pixel = load_triplets(args.pixel_val) if args.pixel_val else None
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = rows(latent, pixel)
    if args.json:
        print(json.dumps({"triplets": len(latent), "2afc": dict(table)}))
        return 0
    print(f"2AFC on {len(latent)} held-out triplets\n\n| distance | 2AFC |\n|---|---|")
    for name, value in table:
        print(f"| {name} | {value:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
