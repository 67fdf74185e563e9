"""The papers' comparisons in miniature, on an embedded shapes teacher -> docs/RESULTS.md.

    .venv/bin/python bench/results.py --seeds 0 1 2        # everything, then docs/RESULTS.md + docs/results.png
    .venv/bin/python bench/results.py --seeds 0 1 2 --eval-split heldout --latency-repeats 0  # its held-out table
    .venv/bin/python bench/results.py --rows teacher-25 d2g --steps 200   # a subset, quickly
    .venv/bin/python bench/results.py --teacher shapes-sd3 --work bench-out/results-sd3  # the flow teacher

1. One pair dataset (pairgen through a local Ray: shapes://train prompts, the teacher's 25-step
   solver (DDIM for the UNet teachers, flow Euler for shapes-sd3), guidance 3).
2. Every student row is trained from it with the same budget (steps, batch, learning rates, seed)
   and exported (`distill export`); rows differ only in their objective settings (ROWS below).
3. Every row, teachers included, is scored by `distill.quality.ShapesQuality` on the same prompts
   and held-out noises: attribute accuracy, Fréchet distance, diversity, latent MSE to the 25-step
   teacher's target; then latency per image at batch 1 (prompt to latent, and with decoding) on
   this CPU, every row timed in this process, round-robin (LATENCY_ROUNDS).
`--seeds 0 1 2` trains each headline student row (SEEDED_ROWS: the papers' comparisons) once per seed
(on the same pairs, scored on the same sets) and reports each figure as mean ± sd; ablations are trained
with the first seed only (their table cell has no ±). `--seeded-rows` chooses other rows to seed. `add-1step` and `add-2step` score the 4-step `add` student at
fewer steps (no training of their own). Re-running reuses the pairs, finished trainings (the trainer
resumes) and cached scores (`--work/scores/<row>[-seed<k>].json`); `--rescore` recomputes the scores.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.evaluate import latency  # noqa: E402
from distill.quality import ShapesQuality, student_sampler, teacher_sampler  # noqa: E402

GUIDANCE = 3.0
# name -> (objective, objective_config, what it tests). Loss options of the LatentLPIPS rows are
# filled in by lpips_kwargs().
STUDENTS: dict[str, tuple[str, dict, str]] = {
    "regression-mse": ("regression", {"regression_loss": "mse"}, "regression only, MSE"),
    "regression-latent-lpips": ("regression", {"regression_loss": "latent_lpips"}, "regression only, LatentLPIPS"),
    "regression-e-latent-lpips": ("regression", {"regression_loss": "e_latent_lpips"},
                                  "regression only, E-LatentLPIPS"),
    "d2g": ("d2g", {}, "Diffusion2GAN: E-LatentLPIPS + GAN, full discriminator"),
    "d2g-no-multiscale": ("d2g", {"d2g_multiscale": False}, "d2g without multi-scale input branches"),
    "d2g-no-r1": ("d2g", {"r1_gamma": 0.0}, "d2g without single-sample R1"),
    "d2g-no-mix-and-match": ("d2g", {"mix_and_match": 0.0}, "d2g without mix-and-match"),
    "d2g-no-z": ("d2g", {"d2g_z_conditioning": False}, "d2g without the noise z conditioning the discriminator"),
    "d2g-no-readout": ("d2g", {"d2g_readout_heads": False}, "d2g with one head on the output instead of readout heads"),
    "regression-pseudo-huber": ("regression", {"regression_loss": "pseudo_huber"}, "regression only, pseudo-Huber"),
    "regression-pixel-lpips": ("regression", {"regression_loss": "pixel_lpips"},
                               "regression only, pixel LPIPS: decode, then the shapes pixel VGG16-BN LPIPS"),
    "add": ("add", {}, "ADD: 4-step student, hinge GAN on frozen teacher features + score distillation"),
    "ladd": ("ladd", {}, "LADD: hinge GAN on frozen teacher features of re-noised latents, no score distillation"),
    "d2g-lora": ("d2g", {}, "d2g with student and discriminator as rank-8 LoRA adapters on one shared frozen UNet"),
}
# LCM-LoRA's choice of modules: attention, feed-forward, the resnets' convolutions and time
# projections, and the resamplers; attention alone cannot move a one-step student far enough.
LORA_TARGETS = "to_q,to_k,to_v,to_out.0,proj_in,proj_out,ff.net.0.proj,ff.net.2,conv1,conv2,conv_shortcut,time_emb_proj,conv"
# Training settings beyond the objective's, per row (the memory options of issue #20).
STUDENT_TRAINING: dict[str, dict] = {
    "d2g-lora": {"generator_lora_rank": 8, "discriminator_lora_rank": 8,
                 "generator_lora_targets": LORA_TARGETS, "discriminator_lora_targets": LORA_TARGETS},
}
# Rows that score another row's student at fewer steps than it was trained for (ADD's 1- and
# 4-step results come from one 4-step student): name -> (student row, sampling steps, what).
FEWER_STEPS: dict[str, tuple[str, int, str]] = {
    "add-1step": ("add", 1, "the add student sampled in 1 step"),
    "add-2step": ("add", 2, "the add student sampled in 2 steps"),
}
TEACHERS: dict[str, tuple[int, float, str]] = {
    "teacher-25": (25, GUIDANCE, "teacher, 25 steps of its solver, guidance 3 (the pairs' solver)"),
    "teacher-4": (4, GUIDANCE, "teacher, 4 steps, guidance 3"),
    "teacher-1": (1, GUIDANCE, "teacher, 1 step, guidance 3"),
    "teacher-1-unguided": (1, 1.0, "teacher, 1 step, no guidance (the student's starting point)"),
}
ROWS = list(TEACHERS) + list(STUDENTS) + list(FEWER_STEPS)
SHAPES_TEACHERS = ("shapes", "shapes-xl", "shapes-sd3")
# Rows a teacher cannot have: the flow (SD3-layout) students refuse score distillation and LoRA, and
# their d2g discriminator has no multi-scale input branches to ablate.
UNSUPPORTED_ROWS = {"shapes-sd3": {"add", "add-1step", "add-2step", "d2g-lora", "d2g-no-multiscale", "d2g-no-readout"}}
# The headline rows, trained once per --seeds seed; the other student rows (ablations) with the first.
SEEDED_ROWS = ("regression-mse", "regression-e-latent-lpips", "d2g", "add", "ladd", "add-1step", "add-2step")
TARGET_ROW = "teacher-25"  # the pairs' own solver: its latents are the students' targets


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="bench-out/results",
                    help="pairs, runs, exports and cached scores (one folder per --teacher)")
    ap.add_argument("--teacher", default="shapes", choices=SHAPES_TEACHERS,
                    help="the embedded teacher distilled: the SD1.5-, SDXL- or SD3-layout (flow-matching) one")
    ap.add_argument("--rows", nargs="+", default=None, choices=ROWS, metavar="ROW",
                    help=f"rows to run (default: every row the teacher supports): {ROWS}")
    ap.add_argument("--num-pairs", type=int, default=8192)
    ap.add_argument("--pairs", default=None, help="use this existing pair store instead of generating --work/pairs")
    ap.add_argument("--steps", type=int, default=800, help="training steps of every student")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr-g", type=float, default=1e-4)
    ap.add_argument("--lr-d", type=float, default=1e-4)
    ap.add_argument("--ema-decay", type=float, default=0.99)
    ap.add_argument("--lambda-gan", type=float, default=None, help="override the d2g rows' GAN weight")
    ap.add_argument("--objective-override", type=json.loads, default={}, metavar="JSON",
                    help='objective options merged into every student row, e.g. \'{"regression_loss": "mse"}\'')
    ap.add_argument("--lpips-weights", default="shapes",
                    help="LatentLPIPS weights: the packaged 'shapes' (default), a .safetensors path, or 'random' "
                         "(an untrained trunk of width 0.25)")
    ap.add_argument("--seed", type=int, default=0, help="pair dataset seed (and the training seed without --seeds)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                    help="training seeds of the headline student rows (default: --seed); with two or more, "
                         "their figures are the mean ± sd over them (one pair dataset, one scoring set); "
                         "ablations use the first")
    ap.add_argument("--seeded-rows", nargs="+", default=None, choices=list(STUDENTS), metavar="ROW",
                    help="the student rows trained once per --seeds seed (default: the headline rows, "
                         f"{', '.join(r for r in SEEDED_ROWS if r in STUDENTS)}); the others use the first "
                         "seed. add-1step and add-2step follow add")
    ap.add_argument("--eval-num", type=int, default=1024, help="prompts/noises scored per row")
    ap.add_argument("--eval-split", default="train", choices=("train", "heldout"),
                    help="prompts scored: the train split the pairs came from, or the held-out attribute "
                         "combinations no pair contains (zero-shot); held-out scores and tables go to "
                         "--work/heldout/")
    ap.add_argument("--latency-repeats", type=int, default=100,
                    help="timed calls per row, spread over 5 round-robin rounds (0: skip latency)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (training and latency)")
    ap.add_argument("--rescore", action="store_true", help="recompute cached scores")
    ap.add_argument("--out", default=None, help="the published table, written when every row the teacher "
                    "supports ran, or when --out is given (default: docs/RESULTS.md for shapes, "
                    "docs/RESULTS-<teacher>.md for the others; a subset without --out writes into --work)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON at the end")
    args = ap.parse_args(argv)
    supported = [row for row in ROWS if row not in UNSUPPORTED_ROWS.get(args.teacher, set())]
    refused = sorted(set(args.rows or ()) - set(supported))
    if refused:
        ap.error(f"--rows {' '.join(refused)}: not supported for --teacher {args.teacher}")
    args.all_rows, args.rows = supported, args.rows or supported
    args.publish = args.out is not None or set(args.rows) == set(supported)
    args.seeds = list(dict.fromkeys(args.seeds or [args.seed]))
    default_out = "RESULTS.md" if args.teacher == "shapes" else f"RESULTS-{args.teacher}.md"
    args.out = args.out or str(ROOT / "docs" / default_out)
    return args


def log(message: str) -> None:
    print(f"[results {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_pairs(args, work: Path) -> str:
    from pairgen.config import load_config
    from pairgen.runner import PairgenRun

    out = str(work / "pairs")
    config = load_config(None, dict(teacher=args.teacher, prompts="shapes://train", out=out, num_pairs=args.num_pairs,
                                    shard_size=512, steps=25, guidance=GUIDANCE, batch_size=128, workers=2,
                                    seed=args.seed, commit_every=0))
    summary = PairgenRun(config, progress=True).run()
    log(f"pairs: {args.num_pairs} at {out} ({summary.pairs_generated} generated now)")
    return out


def objective_config(args, objective: str, overrides: dict) -> dict:
    from distill.losses import latent_lpips_options
    from distill.objective_config import OBJECTIVE_CONFIGS

    preset = OBJECTIVE_CONFIGS[objective]()
    config = {**overrides, **args.objective_override}
    loss = config.get("regression_loss", preset.regression_loss)
    if loss in ("latent_lpips", "e_latent_lpips") and preset.regression_weight > 0:
        config["regression_kwargs"] = latent_lpips_options(args.lpips_weights)
    if objective == "d2g" and args.lambda_gan is not None:
        config["lambda_gan"] = args.lambda_gan
    return config


def seeded(name: str, seed: int, args) -> str:
    """The folder and cache name of a row's run with training seed `seed` (--seed's keeps the bare
    name, so earlier work is reused)."""
    return name if seed == args.seed else f"{name}-seed{seed}"


def train_student(args, work: Path, name: str, pairs: str, seed: int) -> tuple[str, dict]:
    from distill.export import export_student
    from distill.ray_launch import train
    from distill.train_config import load_train_config

    objective, overrides, _ = STUDENTS[name]
    run, model = work / "runs" / seeded(name, seed, args), work / "students" / seeded(name, seed, args)
    settings = dict(
        data=pairs, teacher=args.teacher, out=str(run), objective=objective,
        objective_config=objective_config(args, objective, overrides), max_steps=args.steps,
        batch_size=args.batch_size, lr_g=args.lr_g, lr_d=args.lr_d, ema_decay=args.ema_decay,
        checkpoint_every=max(1, args.steps // 2), log_every=50, use_ray=False, threads=args.threads,
        seed=seed, **STUDENT_TRAINING.get(name, {}))
    config = load_train_config(None, settings)
    began = time.perf_counter()
    summary = train(config)
    if not (model / "d2g_student.json").exists():
        export_student(str(run), str(model))
    log(f"{seeded(name, seed, args)}: trained to step {summary['steps']} ({time.perf_counter() - began:.0f} s)")
    # The options the row set, not the preset's defaults: what RESULTS.json has always recorded.
    objective_options = config.objective_config.model_dump(mode="json", exclude_unset=True)
    return str(model), {"objective": objective, "objective_config": objective_options,
                        "lr_g": config.lr_g, "lr_d": config.lr_d, "train_seconds": summary.get("seconds"),
                        "train_cpu_seconds": summary.get("cpu_seconds"),
                        "steps": summary["steps"], "resumed_from": summary.get("resumed_from"), "seed": seed}


def recorded_training(work: Path, run: str, steps: int) -> dict | None:
    """The record of the training that made `run` (a seeded run name): re-running a finished run
    resumes it as a no-op, whose own record says nothing about what the training cost."""
    for cache in (work / "scores" / f"{run}.json", work / "scores" / "heldout" / f"{run}.json"):
        training = json.loads(cache.read_text()).get("training", {}) if cache.exists() else {}
        if training.get("steps") == steps and training.get("resumed_from") != steps:
            return training
    return None


def sampler_for(name: str, teacher, work: Path, quality: ShapesQuality, folder: str | None = None):
    """(sampler, pipeline whose VAE decodes its latents) of a row; `folder`: the student's run name
    (default `name`; seeded() for other training seeds)."""
    if name == TARGET_ROW:
        return quality.target_sampler, teacher
    if name in TEACHERS:
        steps, guidance, _ = TEACHERS[name]
        return teacher_sampler(teacher, steps, guidance), teacher
    from distill.export import load_student

    base, steps = (FEWER_STEPS[name][0], FEWER_STEPS[name][1]) if name in FEWER_STEPS else (name, None)
    student = load_student(str(work / "students" / (folder or base)))
    return student_sampler(student, steps), student


@torch.no_grad()
def measure_latency(name: str, sampler, pipe, quality: ShapesQuality, repeats: int) -> dict:
    from d2g.teacher.vae import decode, to_unit_range

    prompt, noise = quality.prompts[:1], quality.noise[:1]
    # The 25-step teacher is slow; fewer repeats keep the table quick without changing the median much.
    n = max(3, repeats // 5) if name == TARGET_ROW else repeats
    to_latent = latency(lambda: sampler(prompt, noise), n)
    decoded = latency(lambda: to_unit_range(decode(pipe.vae, sampler(prompt, noise))), n)
    return {"latency_s": to_latent, "latency_decoded_s": decoded}


def score_row(args, work: Path, name: str, teacher, quality: ShapesQuality, pairs: str | None, seed: int) -> dict:
    """One row's scores for one training seed (teacher rows have none), cached in --work/scores."""
    folder = name if name in TEACHERS else seeded(name, seed, args)
    cache = work / "scores" / ("" if args.eval_split == "train" else args.eval_split) / f"{folder}.json"
    if cache.exists() and not args.rescore:
        return json.loads(cache.read_text())
    row: dict = {"row": name, "what": (TEACHERS.get(name) or STUDENTS.get(name) or FEWER_STEPS[name])[-1]}
    student_folder = None
    if name not in TEACHERS:
        trained = FEWER_STEPS[name][0] if name in FEWER_STEPS else name
        _, training = train_student(args, work, trained, pairs, seed)
        student_folder = seeded(trained, seed, args)
        if training["resumed_from"] == training["steps"]:  # add-1step's `add`, a held-out or --rescore run
            training = recorded_training(work, student_folder, training["steps"]) or training
        row["training"] = training
    sampler, _ = sampler_for(name, teacher, work, quality, student_folder)
    row.update(quality.score(sampler))
    log(f"{folder}: accuracy {row['accuracy']:.3f}  frechet {row['frechet']:.1f}  diversity "
        f"{row['diversity']:.2f}  distance {row['distance']:.4f}")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(row, indent=2))
    return row


def row_seeds(args, name: str) -> list[int]:
    """The training seeds a row is scored over: none of its own for a teacher, every --seeds seed
    for a headline row, the first otherwise."""
    if name in TEACHERS:
        return [args.seed]
    trained_as = FEWER_STEPS[name][0] if name in FEWER_STEPS else name
    seeded_rows = SEEDED_ROWS if args.seeded_rows is None else args.seeded_rows
    return args.seeds if trained_as in seeded_rows else args.seeds[:1]


SEEDED_KEYS = ("accuracy", "frechet", "diversity", "distance")


def over_seeds(runs: list[dict], seeds: list[int]) -> dict:
    """A row from its runs with training seeds `seeds`: the first run's record with each SEEDED_KEYS
    figure replaced by the mean over the runs, plus `<key>_sd` (sample standard deviation), the
    seeds and the runs themselves when there are two or more."""
    row = dict(runs[0])
    if len(runs) > 1:
        for key in SEEDED_KEYS:
            values = torch.tensor([run[key] for run in runs], dtype=torch.float64)
            row[key], row[f"{key}_sd"] = float(values.mean()), float(values.std())
        row["seeds"] = seeds
        row["per_seed"] = runs
    return row


def train_seconds(row: dict, key: str = "train_seconds") -> float | None:
    """A row's training time, the median over its seeds (one run timed beside other work does not
    move it): wall-clock, or `train_cpu_seconds`, the training process's CPU time, which stays
    comparable when the machine was shared."""
    runs = row.get("per_seed") or [row]
    seconds = [run.get("training", {}).get(key) for run in runs]
    return statistics.median(seconds) if all(seconds) else None


LATENCY_ROUNDS = 5


def add_latencies(args, rows: dict, samplers: dict, quality: ShapesQuality) -> None:
    """All rows timed in this process, round-robin in LATENCY_ROUNDS rounds of --latency-repeats /
    rounds calls, each figure the median of its rounds: a slow spell of a shared machine then lands
    on one round of every row, not on all the calls of one row (identical networks measured 11.5 and
    17.2 ms when each row was timed in one go)."""
    per_round = max(1, args.latency_repeats // LATENCY_ROUNDS)
    timings: dict[str, list[dict]] = {name: [] for name in samplers}
    for _ in range(LATENCY_ROUNDS):
        for name, (sampler, pipe) in samplers.items():
            timings[name].append(measure_latency(name, sampler, pipe, quality, per_round))
    for name, rounds in timings.items():
        rows[name].update({key: statistics.median(r[key] for r in rounds) for key in rounds[0]})
    base = rows.get(TARGET_ROW)
    if base is None:
        return
    for row in rows.values():
        row["speedup"] = base["latency_s"] / row["latency_s"]
        row["speedup_decoded"] = base["latency_decoded_s"] / row["latency_decoded_s"]


@torch.no_grad()
def write_grid(samplers: dict, quality: ShapesQuality, path: Path, count: int = 10) -> None:
    from distill.preview import grid_png

    images = [quality.images(sampler(quality.prompts[:count], quality.noise[:count]))
              for sampler, _ in samplers.values()]
    path.write_bytes(grid_png(torch.cat(images), columns=count))


# (header, row key, format); a missing key (latency skipped) leaves the cell empty.
COLUMNS = (
    ("every attribute right", "accuracy", lambda v: f"{100 * v:.1f}%"),
    ("Fréchet", "frechet", lambda v: f"{v:.0f}"),
    ("diversity", "diversity", lambda v: f"{v:.2f}"),
    ("MSE to 25-step target", "distance", lambda v: f"{v:.4f}"),
    ("ms / image to latent", "latency_s", lambda v: f"{1000 * v:.1f}"),
    ("ms / image decoded", "latency_decoded_s", lambda v: f"{1000 * v:.1f}"),
    ("speed-up", "speedup", lambda v: f"{v:.1f}x"),
    ("speed-up decoded", "speedup_decoded", lambda v: f"{v:.1f}x"),
    ("training s", "train_s", lambda v: f"{v:.0f}"),
    ("training CPU s", "train_cpu_s", lambda v: f"{v:.0f}"),
)


def cell(row: dict, key: str, fmt) -> str:
    """A figure, with ± its standard deviation over seeds when measured; empty when missing."""
    if row.get(key) is None:
        return ""
    sd = row.get(f"{key}_sd")
    return fmt(row[key]) if sd is None else f"{fmt(row[key])} ± {fmt(sd)}"


def markdown(rows: dict, floor: dict) -> str:
    """The table; a column no row has a figure for (latency when skipped) is left out."""
    columns = [c for c in COLUMNS if any(r.get(c[1]) is not None for r in rows.values())]
    head = ("row", *(header for header, _, _ in columns))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [f"`{name}`", *(cell(r, key, fmt) for _, key, fmt in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Real renderings: Fréchet between two real sets {floor['frechet']:.0f} (the floor), "
              f"diversity {floor['diversity']:.2f}."]
    return "\n".join(lines)


def section_markers(split: str) -> tuple[str, str]:
    """The markers around the generated table of an --eval-split in the published document."""
    name = "results" if split == "train" else f"results-{split}"
    return f"<!-- {name}:begin (written by bench/results.py) -->", f"<!-- {name}:end -->"


def write_results_section(path: Path, body: str, split: str = "train") -> None:
    """Replace the generated section of RESULTS.md for `split`, keeping the prose around it."""
    begin, end = section_markers(split)
    text = path.read_text() if path.exists() else f"# Results\n\n{begin}\n{end}\n"
    if begin not in text or end not in text:
        raise SystemExit(f"{path}: markers {begin!r} / {end!r} missing; add them where the table goes")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{begin}\n{body}\n{end}{tail}")


def write_record(path: Path, record: dict, split: str) -> None:
    """The published JSON: the train split's record at the top level, another split's under its name;
    writing one split keeps the other's."""
    earlier = json.loads(path.read_text()) if path.exists() else {}
    others = {key: earlier[key] for key in ("heldout",) if key in earlier}
    merged = {**record, **others} if split == "train" else {**earlier, split: record}
    path.write_text(json.dumps(merged, indent=2, default=str))


def command_line(argv) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join([".venv/bin/python bench/results.py", *args])


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    began = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from d2g.teacher.loading import load_teacher

    teacher = load_teacher(args.teacher)
    steps, guidance, _ = TEACHERS[TARGET_ROW]
    quality = ShapesQuality(teacher, num=args.eval_num, target_steps=steps, target_guidance=guidance,
                            split=args.eval_split)
    needs_pairs = any(name in STUDENTS for name in args.rows)
    pairs = (args.pairs or make_pairs(args, work)) if needs_pairs else None
    rows = {}
    for name in args.rows:
        seeds = row_seeds(args, name)
        rows[name] = over_seeds([score_row(args, work, name, teacher, quality, pairs, seed) for seed in seeds], seeds)
        if args.eval_split == "train":  # the same trainings as the train split's table: shown there
            rows[name]["train_s"] = train_seconds(rows[name])
            rows[name]["train_cpu_s"] = train_seconds(rows[name], "train_cpu_seconds")
    # Latency and the figure use the first seed's students (the networks are the same size).
    first = {name: None if name in TEACHERS else seeded(FEWER_STEPS.get(name, (name,))[0], args.seeds[0], args)
             for name in rows}
    samplers = {name: sampler_for(name, teacher, work, quality, first[name]) for name in rows}
    if args.latency_repeats > 0:
        log("latency, every row in turn")
        add_latencies(args, rows, samplers, quality)
    floor = quality.real_floor()
    # Only a run of every row, or one told where with --out, replaces a published table (each split
    # has its own section); other subsets write into --work, so a quick check cannot overwrite it.
    split = args.eval_split
    out = Path(args.out) if args.publish else work / ("" if split == "train" else split) / "RESULTS.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    grid = out.with_name(out.stem.lower() + ("" if split == "train" else f"-{split}") + ".png")
    write_grid(samplers, quality, grid)
    table = markdown(rows, floor)
    print(table)
    seconds = time.perf_counter() - began
    seeds = (f"headline rows over training seeds {', '.join(map(str, args.seeds))} (mean ± sd), ablations seed "
             f"{args.seeds[0]}" if len(args.seeds) > 1 else f"seed {args.seeds[0]}")
    body = (f"Measured {time.strftime('%Y-%m-%d')} with `{command_line(argv)}` (teacher {args.teacher}; {seeds}; "
            f"{args.num_pairs} pairs; {args.steps} steps of batch {args.batch_size} per student; "
            f"{args.eval_num} prompts and noises per row; torch {torch.__version__}, {args.threads} threads; "
            f"{seconds / 60:.0f} min in all).\n\n{table}\n\n![rows of the table, same prompts and noises]({grid.name})\n")
    write_results_section(out, body, split)
    # Paths relative to the repository, so the committed record names no machine's directories.
    recorded_args = {**vars(args), "out": str(Path(args.out).resolve().relative_to(ROOT))
                     if Path(args.out).resolve().is_relative_to(ROOT) else args.out}
    record = {"rows": rows, "floor": floor, "args": recorded_args, "date": time.strftime("%Y-%m-%d"),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
              "torch": torch.__version__, "seconds": seconds}
    write_record(out.with_suffix(".json"), record, split)
    log(f"wrote {out}, {grid} and {out.with_suffix('.json')}")
    if args.json:
        print(json.dumps(record, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
