"""Measure the shapes teacher against the quality bar of issue 8.

    python -m d2g.shapes.evaluate --steps 25 --guidance 2 3 4 --n 500 --json

Reports, with the packaged evaluator as judge:
- attribute accuracy of N samples for new prompts of the training distribution (new noise seeds), at
  each guidance scale; the best scale is then used for the held-out attribute combinations,
  the 1-step sample, the Fréchet distance and the diversity;
- Fréchet distance of evaluator features, generated vs real (N each), beside its floor (two
  independent real sets of N);
- diversity: mean pairwise feature distance among K samples of one prompt, beside the same
  figure for K real renderings of the same attributes;
- the VAE's reconstruction attribute accuracy on real held-out-combination images;
- the evaluator's own accuracy on real images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from d2g.shapes import sampling, world
from d2g.shapes.evaluator import DEFAULT_PATH, Evaluator, diversity, frechet_distance
from d2g.teacher.vae import decode, encode

# World seeds for evaluation, all distinct from training (0 for the teacher, 7 for the judge).
PROMPT_SEED, REAL_SEED_A, REAL_SEED_B, HELDOUT_SEED = 101, 2001, 3001, 4001


def real_set(seed: int, n: int, split: str = "train") -> tuple[np.ndarray, list[world.Attributes]]:
    """`n` real world images of `split` from world seed `seed`, with their attributes."""
    images, _, attrs = world.batch(seed, 0, n, split)
    return images, attrs


@torch.no_grad()
def vae_reconstruction_accuracy(pipe, judge: Evaluator, n: int) -> dict[str, float]:
    """Attribute accuracy of the teacher VAE's reconstructions of `n` real held-out-combination
    images: what the VAE alone loses, a ceiling for the teacher."""
    images, attrs = real_set(HELDOUT_SEED, n, "heldout")
    x = world.to_tensor(images)
    recon = torch.cat([decode(pipe.vae, encode(pipe.vae, c)) for c in x.split(256)])
    return judge.attribute_accuracy(recon, attrs)


def _rounded(d: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in d.items()}


def evaluate_teacher(teacher: str | Path = sampling.TEACHER_PATH, evaluator: str | Path = DEFAULT_PATH,
                     steps: int = 25, guidances: tuple[float, ...] = (3.0,), n: int = 500,
                     diversity_prompts: int = 32, diversity_samples: int = 8, seed: int = 0,
                     one_step: bool = True) -> dict:
    """All quality-bar figures as a dict (see the module docstring)."""
    t0 = time.time()
    pipe = sampling.load_pipeline(teacher)
    judge = Evaluator.load(evaluator)
    report: dict = {"teacher": str(teacher), "steps": steps, "n": n, "seed": seed}

    real_a, attrs_a = real_set(REAL_SEED_A, n)
    real_b, _ = real_set(REAL_SEED_B, n)
    held_real, held_attrs = real_set(HELDOUT_SEED, n, "heldout")
    report["evaluator_accuracy_real"] = {"train_split": _rounded(judge.attribute_accuracy(real_a, attrs_a)),
                                         "heldout_split": _rounded(judge.attribute_accuracy(held_real, held_attrs))}
    report["vae_reconstruction_accuracy_heldout"] = _rounded(vae_reconstruction_accuracy(pipe, judge, n))

    texts, attrs = sampling.prompts(PROMPT_SEED, n, "train")
    by_guidance, samples = {}, {}
    for g in guidances:
        samples[g] = sampling.generate(pipe, texts, steps, g, seed)
        by_guidance[str(g)] = _rounded(judge.attribute_accuracy(samples[g], attrs))
        print(f"[evaluate] {steps} steps, guidance {g}: {by_guidance[str(g)]}", file=sys.stderr, flush=True)
    best = max(guidances, key=lambda g: by_guidance[str(g)]["all"])
    report["accuracy_by_guidance"] = by_guidance
    report["best_guidance"] = best

    held_texts, held_attrs_p = sampling.prompts(PROMPT_SEED, n, "heldout")
    held_samples = sampling.generate(pipe, held_texts, steps, best, seed)
    report["heldout_combinations_accuracy"] = _rounded(judge.attribute_accuracy(held_samples, held_attrs_p))

    real_features = judge.features(real_a)
    report["frechet"] = {
        "teacher": round(frechet_distance(judge.features(samples[best]), real_features), 4),
        "floor_real_vs_real": round(frechet_distance(judge.features(real_b), real_features), 4),
    }
    report["frechet"]["ratio_to_floor"] = round(report["frechet"]["teacher"] / report["frechet"]["floor_real_vs_real"], 2)

    if one_step:
        one = sampling.generate(pipe, texts, 1, best, seed)
        report["one_step"] = {"guidance": best, "accuracy": _rounded(judge.attribute_accuracy(one, attrs)),
                              "frechet": round(frechet_distance(judge.features(one), real_features), 4)}

    p, k = diversity_prompts, diversity_samples
    div_texts, div_attrs = sampling.prompts(PROMPT_SEED + 1, p, "train")
    repeated = [t for t in div_texts for _ in range(k)]
    gen = sampling.generate(pipe, repeated, steps, best, seed + 10**6)
    rng = np.random.default_rng(seed)
    real = np.stack([world.render(a, rng) for a in div_attrs for _ in range(k)])
    report["diversity"] = {
        "teacher": round(diversity(judge.features(gen).view(p, k, -1)), 4),
        "real_same_attributes": round(diversity(judge.features(real).view(p, k, -1)), 4),
        "prompts": p, "samples_per_prompt": k,
    }
    report["seconds"] = round(time.time() - t0, 1)
    return report


def main(argv=None) -> int:
    """`python -m d2g.shapes.evaluate`: print the report (as JSON with --json); returns the exit code."""
    ap = argparse.ArgumentParser(prog="python -m d2g.shapes.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=sampling.TEACHER_PATH)
    ap.add_argument("--evaluator", type=Path, default=DEFAULT_PATH)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, nargs="+", default=[3.0], help="one or more scales; the best is used")
    ap.add_argument("--n", type=int, default=500, help="images per measured set")
    ap.add_argument("--seed", type=int, default=0, help="noise seed of the samples")
    ap.add_argument("--no-one-step", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = evaluate_teacher(args.teacher, args.evaluator, args.steps, tuple(args.guidance), args.n,
                              seed=args.seed, one_step=not args.no_one_step)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
