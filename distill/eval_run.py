"""`distill eval --prompts`: zero-shot evaluation as the papers report it (FID and CLIP score on
COCO captions), for an exported student or for a teacher at N steps (the side-by-side row).

Images are generated in shards of `shard_size` prompts, in this process or as Ray tasks
(`workers` in flight, fractional CPUs/GPUs each). Prompt i's starting noise is
d2g.teacher.noise.sample_noise(seed, i) and a student's between-step noise continues the same
generator (distill.generator.seeded_noise, as `distill generate`); the teacher runs DDIM (eta 0,
trailing grid), or flow Euler with its own sigma shifting for an SD3/FLUX-style teacher. Every
image is a PNG under OUT/NAME/images/ with its prompt, id, seed and steps in its text chunks; a
shard is finished once its marker OUT/NAME/shards/shard-NNNNN.json exists, written after its PNGs.
Re-running skips finished shards and redoes the others, so a killed evaluation resumes to the same
images and the same figures. The metrics (distill.eval_metrics)
then read the PNGs back (lossless: the figures are those of the 8-bit images a user would save)
and go to OUT/NAME/result.json and one row of OUT/results.md.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import sys
import time

import fsspec
import numpy as np
import torch
import xxhash

from distill.eval_config import EvalConfig
from distill.eval_metrics import MetricsError

SHAPES_REAL_SEED = 5_003  # real renderings for the shapes FID reference (distill.quality's REAL_SEED)
SHAPES_PROMPT_SEED = 5_001  # shapes:// prompts (distill.quality's PROMPT_SEED)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class EvalError(ValueError):
    """The evaluation cannot run as asked; the message names the option or file."""


# --- prompts ----------------------------------------------------------------------------------------

def read_eval_prompts(url: str, num: int | None = None, column: str | None = None) -> list[dict]:
    """Rows {index, id, caption} of a prompt file (.jsonl, .parquet, .csv, .txt) or shapes://SPLIT,
    the first `num` of them (shapes://: `num` drawn captions, default 256)."""
    if url.startswith("shapes://"):
        from d2g.shapes import sampling

        split = url.split("://", 1)[1] or "train"
        try:
            texts, _ = sampling.prompts(SHAPES_PROMPT_SEED, num or 256, split)
        except ValueError as err:
            raise EvalError(f"--prompts {url}: {err}") from None
        return [{"index": i, "id": i, "caption": t} for i, t in enumerate(texts)]
    try:
        with fsspec.open(url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise EvalError(f"--prompts {url} does not exist") from None
    name = url.lower()
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        records = pq.read_table(io.BytesIO(data)).to_pylist()
    elif name.endswith((".jsonl", ".json")):
        records = []
        for number, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise EvalError(f"--prompts {url}, line {number}: invalid JSON ({err.msg})") from None
    elif name.endswith(".csv"):
        import csv

        records = list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    else:
        records = [{"caption": line} for line in data.decode("utf-8").splitlines() if line.strip()]
    if records and not isinstance(records[0], dict):
        raise EvalError(f"--prompts {url}: expected one JSON object per line")
    key = column or next((k for k in ("caption", "prompt") if records and k in records[0]), None)
    if key is None or (records and key not in records[0]):
        raise EvalError(f"--prompts {url}: no column {column or 'caption or prompt'!r}")
    rows = [{"index": i, "id": r.get("id", i), "caption": str(r[key]).strip()} for i, r in enumerate(records)]
    rows = rows[:num] if num else rows
    if len(rows) < 2 or any(not r["caption"] for r in rows):
        raise EvalError(f"--prompts {url}: need at least 2 non-empty prompts")
    return rows


# --- what is evaluated ------------------------------------------------------------------------------

def describe_subject(config: EvalConfig) -> dict:
    """kind (student/teacher), source, steps, guidance, whether it is a shapes-world model, and its row name."""
    from d2g.teacher.loading import ALIASES, absolute_teacher

    shapes_paths = {os.path.abspath(p) for p in ALIASES.values()}
    if config.model:
        from distill.export import STUDENT_INFO, recommended_steps

        if "://" not in config.model and not os.path.isdir(config.model):
            raise EvalError(f"--model {config.model}: no such folder (an exported student, distill export)")
        info_path = os.path.join(config.model, STUDENT_INFO)
        teacher = json.loads(open(info_path).read()).get("teacher") if os.path.exists(info_path) else None
        steps = config.steps or recommended_steps(config.model)
        shapes = teacher in ALIASES or (teacher is not None and os.path.abspath(teacher) in shapes_paths)
        source = os.path.abspath(config.model) if "://" not in config.model else config.model
        name = config.name or f"{os.path.basename(source.rstrip('/'))}-{steps}step"
        info = json.loads(open(info_path).read()) if os.path.exists(info_path) else {}
        # What identifies the weights: a re-export of another step into the same folder is another model.
        export = {k: info.get(k) for k in ("run", "step", "weights")}
        # Flow (SD3/FLUX) students: the T5 token count they were trained with (None: UNet students).
        return {"kind": "student", "source": source, "steps": steps, "guidance": 0.0, "shapes": shapes,
                "teacher": teacher, "name": name, "export": export,
                "max_sequence_length": info.get("max_sequence_length")}
    steps = config.steps or 25
    teacher = config.teacher
    shapes = teacher in ALIASES or os.path.abspath(teacher) in shapes_paths
    source = absolute_teacher(teacher)
    name = config.name or f"teacher-{os.path.basename(teacher.rstrip('/'))}-{steps}step-cfg{config.guidance:g}"
    return {"kind": "teacher", "source": source, "steps": steps, "guidance": config.guidance, "shapes": shapes,
            "teacher": teacher, "name": name}


def _device(name: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


# --- generation -------------------------------------------------------------------------------------

_PIPES: dict = {}  # one pipeline per worker process, reused by every shard it runs


def _pipeline(subject: dict, device: str):
    key = (subject["kind"], subject["source"], device)
    if key not in _PIPES:
        from d2g.teacher.loading import load_teacher

        _PIPES.clear()
        _PIPES[key] = load_teacher(subject["source"], device=device)
    return _PIPES[key]


@torch.no_grad()
def sample_images(subject: dict, pipe, captions: list[str], indices: list[int], seed: int) -> np.ndarray:
    """uint8 images [N, H, W, 3] for `captions`, sample j's noise a function of (seed, indices[j])."""
    from d2g.teacher.vae import decode, latent_shape, to_unit_range
    from store import LATENT

    shape = latent_shape(pipe)
    if subject["kind"] == "student":
        from distill.export import student_latents
        from distill.generator import seeded_noise

        noise, generators = seeded_noise(seed, indices, shape)
        latents = student_latents(pipe, captions, noise.to(pipe.device), subject["steps"], generators,
                                  max_sequence_length=subject.get("max_sequence_length"))
    else:
        from d2g.teacher.noise import batch_noise
        from d2g.teacher.solver import SolverSettings, TeacherSolver

        # auto: DDIM for UNet teachers, flow Euler for SD3/FLUX-style ones (their pipelines' own shift).
        solver = TeacherSolver(pipe, SolverSettings(scheduler="auto", steps=subject["steps"],
                                                    guidance=subject["guidance"], timestep_spacing="trailing"))
        latents = solver.solve(captions, batch_noise(seed, indices, shape))[LATENT]
    images = to_unit_range(decode(pipe.vae, latents.to(pipe.device)))
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def _png(image: np.ndarray, text: dict) -> bytes:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, str(value))
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def image_name(index: int) -> str:
    """The file name of prompt `index`'s image under NAME/images/."""
    return f"{index:06d}.png"


def generate_shard(subject: dict, rows: list[dict], shard: int, seed: int, run_url: str, batch_size: int,
                   device: str = "cpu") -> dict:
    """Generate and save the images of `rows` (one shard), then its marker; returns the marker."""
    fs, root = fsspec.core.url_to_fs(run_url)
    pipe = _pipeline(subject, _device(device))
    fs.makedirs(posixpath.join(root, "images"), exist_ok=True)
    fs.makedirs(posixpath.join(root, "shards"), exist_ok=True)
    digest = xxhash.xxh3_64()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        images = sample_images(subject, pipe, [r["caption"] for r in chunk], [r["index"] for r in chunk], seed)
        for row, image in zip(chunk, images, strict=True):
            data = _png(image, {"prompt": row["caption"], "prompt_id": row["id"], "seed": seed,
                                "noise_index": row["index"], "steps": subject["steps"], "model": subject["source"],
                                "generator": "d2g eval"})
            digest.update(data)
            with fs.open(posixpath.join(root, "images", image_name(row["index"])), "wb") as f:
                f.write(data)
    marker = {"shard": shard, "first": rows[0]["index"], "count": len(rows), "png_xxh3": digest.hexdigest()}
    # The marker last, whole: a shard without one is redone on the next run.
    with fs.open(posixpath.join(root, "shards", f"shard-{shard:05d}.json"), "w") as f:
        f.write(json.dumps(marker))
    return marker


def _finished(fs, root: str, shard: int, rows: list[dict]) -> bool:
    path = posixpath.join(root, "shards", f"shard-{shard:05d}.json")
    if not fs.exists(path):
        return False
    marker = json.loads(fs.cat_file(path))
    return marker.get("first") == rows[0]["index"] and marker.get("count") == len(rows)


def _check_spec(fs, root: str, spec: dict) -> None:
    """Images of other settings in the same folder are never mixed with these."""
    path = posixpath.join(root, "spec.json")
    if fs.exists(path):
        old = json.loads(fs.cat_file(path))
        changed = [k for k in spec if old.get(k) != spec[k]]
        if changed:
            raise EvalError(f"{root} holds images made with other settings ({changed[0]}: {old.get(changed[0])!r} "
                            f"there, {spec[changed[0]]!r} now); give another --out or --name (nothing was changed)")
        return
    fs.makedirs(root, exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(json.dumps(spec, indent=2))


def generate_all(config: EvalConfig, subject: dict, rows: list[dict], run_url: str, progress: bool = True) -> dict:
    """Every shard's images, skipping finished shards; in this process or on Ray (`workers` > 0).
    Returns {generated, reused} shard counts."""
    from tqdm import tqdm

    fs, root = fsspec.core.url_to_fs(run_url)
    shards = [(s, rows[i:i + config.shard_size]) for s, i in enumerate(range(0, len(rows), config.shard_size))]
    todo = [(s, part) for s, part in shards if not _finished(fs, root, s, part)]
    bar = tqdm(total=len(todo), unit="shard", desc=f"eval {subject['name']}", disable=not progress or not todo,
               file=sys.stderr)
    if config.workers == 0:
        for s, part in todo:
            generate_shard(subject, part, s, config.seed, run_url, config.batch_size, config.device)
            bar.update(1)
    else:
        from d2g.cli.ray_start import ensure_ray

        ray = ensure_ray()
        task = ray.remote(num_cpus=config.cpus_per_worker, num_gpus=config.gpus_per_worker,
                          max_retries=2)(generate_shard)
        pending, waiting = list(todo), []
        while pending or waiting:
            while pending and len(waiting) < config.workers:
                s, part = pending.pop(0)
                waiting.append(task.remote(subject, part, s, config.seed, run_url, config.batch_size, config.device))
            done, waiting = ray.wait(waiting, num_returns=1)
            ray.get(done)
            bar.update(1)
    bar.close()
    return {"shards": len(shards), "generated": len(todo), "reused": len(shards) - len(todo)}


# --- metrics ----------------------------------------------------------------------------------------

def _read_png(fs, path: str) -> np.ndarray:
    from PIL import Image

    with fs.open(path, "rb") as f:
        return np.asarray(Image.open(f).convert("RGB"))


def generated_batches(run_url: str, rows: list[dict], batch_size: int):
    """(uint8 images [N, H, W, 3], captions) of the saved images, in prompt order."""
    fs, root = fsspec.core.url_to_fs(run_url)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        images = np.stack([_read_png(fs, posixpath.join(root, "images", image_name(r["index"]))) for r in chunk])
        yield images, [r["caption"] for r in chunk]


def reference_batches(reference: str, batch_size: int, num: int):
    """uint8 images [N, H, W, 3] of a reference: an image folder (sorted names, any sizes) or
    shapes://SPLIT (`num` real renderings)."""
    if reference.startswith("shapes://"):
        from d2g.shapes import world

        split = reference.split("://", 1)[1] or "train"
        for start in range(0, num, batch_size):
            yield world.batch(SHAPES_REAL_SEED, start, min(batch_size, num - start), split)[0]
        return
    fs, root = fsspec.core.url_to_fs(reference)
    if not fs.isdir(root):
        raise EvalError(f"--reference {reference}: not an image folder, .npz statistics or shapes://SPLIT")
    files = sorted(p for p in fs.ls(root, detail=False) if p.lower().endswith(IMAGE_SUFFIXES))
    if len(files) < 2:
        raise EvalError(f"--reference {reference}: fewer than 2 images ({', '.join(IMAGE_SUFFIXES)})")
    for start in range(0, len(files), batch_size):
        batch = [_read_png(fs, p) for p in files[start:start + batch_size]]
        if len({b.shape for b in batch}) > 1:  # mixed sizes (COCO): one at a time through the protocol
            for image in batch:
                yield image[None]
        else:
            yield np.stack(batch)


def _metric_settings(config: EvalConfig, subject: dict) -> dict:
    feature_net = config.feature_net
    if feature_net == "auto":
        if not subject["shapes"]:
            raise EvalError("--feature-net: give inception:PATH (a local TorchScript inception-2015-12-05.pt) "
                            "for a non-shapes model; nothing is downloaded")
        feature_net = "shapes"
    protocol = config.protocol or ("native" if feature_net == "shapes" else "clean")
    reference = config.reference or ("shapes://train" if subject["shapes"] else None)
    clip = "shapes-attributes" if subject["shapes"] and not config.clip_model else config.clip_model
    metrics = config.metric_list()
    if "fid" in metrics and not reference:
        raise EvalError("--reference is required for fid: an image folder or .npz statistics (mu, sigma)")
    if "clip" in metrics and not clip:
        raise EvalError("--clip-model is required for clip: a local CLIP folder (nothing is downloaded)")
    return {"feature_net": feature_net, "protocol": protocol, "reference": reference, "clip_model": clip}


def _reference_stats(fid, settings: dict, out: str, num: int, batch_size: int) -> dict:
    """Load or compute (and cache under OUT/reference-stats/) the reference statistics."""
    from distill.eval_metrics import load_statistics, save_statistics

    reference = settings["reference"]
    if reference.lower().endswith(".npz"):
        fid.set_reference(*load_statistics(reference))
        return {"reference_stats": reference}
    key = xxhash.xxh3_64_hexdigest(json.dumps([reference, settings["feature_net"], settings["protocol"],
                                               num if reference.startswith("shapes://") else None]).encode())
    fs, root = fsspec.core.url_to_fs(out)
    cache = posixpath.join(root, "reference-stats", f"{key}.npz")
    if fs.exists(cache):
        with fs.open(cache, "rb") as f:
            fid.set_reference(*load_statistics(io.BytesIO(f.read())))
        return {"reference_stats": cache}
    for images in reference_batches(reference, batch_size, num):
        fid.update(images, real=True)
    mu, sigma, n = fid.statistics(real=True)
    buffer = io.BytesIO()
    save_statistics(buffer, mu, sigma, n, reference=reference, feature_net=settings["feature_net"],
                    protocol=settings["protocol"])
    fs.makedirs(posixpath.dirname(cache), exist_ok=True)
    with fs.open(cache, "wb") as f:
        f.write(buffer.getvalue())
    return {"reference_stats": cache, "reference_images": n}


def compute_metrics(config: EvalConfig, subject: dict, rows: list[dict], run_url: str) -> dict:
    """The asked metrics of the saved images (see distill.eval_metrics), with their settings."""
    from distill.eval_metrics import FID, AttributeAgreement, CLIPScoreMetric, get_protocol, load_feature_net

    settings = _metric_settings(config, subject)
    protocol = get_protocol(settings["protocol"])
    metrics = config.metric_list()
    report: dict = {**settings, "protocol_description": protocol.description}
    fid = clip = None
    if "fid" in metrics:
        fid = FID(load_feature_net(settings["feature_net"]), protocol)
        report.update(_reference_stats(fid, settings, config.out, len(rows), config.batch_size))
    if "clip" in metrics:
        clip = AttributeAgreement() if settings["clip_model"] == "shapes-attributes" else \
            CLIPScoreMetric(settings["clip_model"], protocol)
        report["clip_kind"] = ("attribute agreement: % of images with every attribute right (shapes evaluator)"
                               if settings["clip_model"] == "shapes-attributes" else "100 * cos, mean, clipped at 0")
    for images, captions in generated_batches(run_url, rows, config.batch_size):
        if fid is not None:
            fid.update(images, real=False)
        if clip is not None:
            clip.update(images, captions)
    if fid is not None:
        report["fid"] = fid.compute()
    if clip is not None:
        report["clip"] = clip.compute()
    return report


# --- results ----------------------------------------------------------------------------------------

TABLE_HEADER = ["| model | kind | steps | guidance | images | FID | CLIP | feature net | protocol | seed |",
                "|---|---|---|---|---|---|---|---|---|---|"]


def markdown_row(result: dict) -> str:
    """One row of results.md for a result of `evaluate_prompts`."""
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else ("-" if v is None else str(v))

    m = result["metrics"]
    return (f"| {result['name']} | {result['kind']} | {result['steps']} | {fmt(result['guidance'])} | {result['num']} "
            f"| {fmt(m.get('fid'))} | {fmt(m.get('clip'))} | {m.get('feature_net', '-')} | {m.get('protocol', '-')} "
            f"| {result['seed']} |")


def write_results(out: str, result: dict) -> str:
    """OUT/NAME/result.json, and NAME's row in OUT/results.md (replacing an older row of the same
    name, keeping the others); returns the Markdown path."""
    fs, root = fsspec.core.url_to_fs(out)
    with fs.open(posixpath.join(root, result["name"], "result.json"), "w") as f:
        f.write(json.dumps(result, indent=2))
    table = posixpath.join(root, "results.md")
    lines = fs.cat_file(table).decode().splitlines() if fs.exists(table) else list(TABLE_HEADER)
    lines = [ln for ln in lines if not ln.startswith(f"| {result['name']} |")] + [markdown_row(result)]
    with fs.open(table, "w") as f:
        f.write("\n".join(lines) + "\n")
    return table


def evaluate_prompts(config: EvalConfig, progress: bool = True) -> dict:
    """Generate (resumably) and score the images of `config` (see the module docstring); returns
    the result also written to OUT/NAME/result.json and OUT/results.md."""
    began = time.perf_counter()
    subject = describe_subject(config)
    rows = read_eval_prompts(config.prompts, config.num, config.prompts_column)
    _metric_settings(config, subject)  # a missing --reference or --clip-model fails before any image is made
    run_url = config.out.rstrip("/") + "/" + subject["name"]
    fs, root = fsspec.core.url_to_fs(run_url)
    prompts_xxh3 = xxhash.xxh3_64_hexdigest("\0".join(r["caption"] for r in rows).encode())
    _check_spec(fs, root, {"kind": subject["kind"], "source": subject["source"], "export": subject.get("export"),
                           "steps": subject["steps"],
                           "guidance": subject["guidance"], "seed": config.seed, "prompts_xxh3": prompts_xxh3,
                           "shard_size": config.shard_size})
    shards = generate_all(config, subject, rows, run_url, progress)
    generated_s = time.perf_counter() - began
    try:
        metrics = compute_metrics(config, subject, rows, run_url)
    except MetricsError as err:
        raise EvalError(str(err)) from None
    result = {"name": subject["name"], "kind": subject["kind"], "model": subject["source"],
              "teacher": subject["teacher"], "steps": subject["steps"], "guidance": subject["guidance"],
              "prompts": config.prompts, "prompts_xxh3": prompts_xxh3, "num": len(rows), "seed": config.seed,
              "metrics": metrics, "shards": shards, "images": run_url + "/images",
              "seconds_generating": round(generated_s, 2), "seconds": round(time.perf_counter() - began, 2)}
    result["results_md"] = write_results(config.out, result)
    return result
