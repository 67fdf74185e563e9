"""Export a trained student as a stock diffusers pipeline folder, and generate with it.

The folder is the teacher's pipeline (VAE, text encoders, tokenizers) with the student's UNet and
the student's own sampler as a stock scheduler: an LCMScheduler (distill.generator.student_scheduler)
that predicts x0 at each timestep of the student's grid and re-noises it with fresh noise to the
next, exactly the training-time sampler (distill.generator.few_step_sample). Load it with
`DiffusionPipeline.from_pretrained(DIR)` and call it with `num_inference_steps=N` (the student's
steps, recorded in the model card and in STUDENT_INFO; fewer run a subset of its grid) and
`guidance_scale=0`; `generator=` draws the between-step noise. Images come from d2g.teacher.vae
(`decode`, then `to_unit_range` for PNGs), as for the teacher. Exports older than few-step support
have a one-step DDIM scheduler and run one step.

A student of a flow-matching transformer teacher (SD3- or FLUX-style; distill.flow_student) is
exported into the stock StableDiffusion3Pipeline / FluxPipeline with a pinned
FlowMatchEulerDiscreteScheduler (shift 1, stochastic sampling: distill.flow_student.flow_student_scheduler):
one step evaluates sigma 1 and lands on x - v. FLUX students export for 1 to 4 steps (FluxPipeline
passes the sigmas linspace(1, 1/N, N) the student was trained on) and SD3 students too (the
scheduler's `shift_terminal=1/N` stretches StableDiffusion3Pipeline's own grid onto the student's);
the between-step noise comes from torch's global RNG. STUDENT_INFO records the T5 `max_sequence_length` of the pairs, which the call should
pass, and FLUX's guidance-embedding value as `guidance_scale`.

A LoRA student (distill train --generator-lora-rank) is exported both ways: the folder holds the
pipeline with the adapter merged into the UNet (as above), and LORA_FOLDER/pytorch_lora_weights.safetensors,
the adapter in diffusers' LoRA format (with its LoraConfig as metadata) for the stock teacher
pipeline: `pipe.load_lora_weights(DIR/lora)` plus the exported scheduler
(`LCMScheduler.from_pretrained(DIR, subfolder="scheduler")`) runs the same student. The merged UNet
is made from that file (load_lora_weights, fuse_lora, unload_lora_weights), so both are the adapter
a user loads.
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

import torch

from d2g.teacher.loading import load_teacher
from distill.checkpoint import CheckpointError, CheckpointStore
from distill.generator import Generators, student_scheduler
from distill.train_config import TrainConfig
from store import NOISE, PROMPT

STUDENT_INFO = "d2g_student.json"
UNET_STEPS_NOTE = "the steps it was trained for; fewer run a\n  subset of its timesteps, more are refused by its scheduler"
FLOW_STEPS_NOTE = ("the steps it was trained for; run these: the stock scheduler refuses\n  no other number, but "
                   "another number evaluates sigmas the student was not trained at (and one step\n  of a "
                   "multi-step SD3 student gives NaN: its scheduler's `shift_terminal` needs two or more)")
UNET_SCHEDULER_NOTE = """`LCMScheduler` with `original_inference_steps={steps}` and `timestep_scaling=1e10`:
  each step predicts the clean latent and re-noises it with fresh noise from `generator` to the next
  timestep, the sampler the student was trained with"""
FLOW_SCHEDULER_NOTE = """`FlowMatchEulerDiscreteScheduler` with `shift=1.0` and `stochastic_sampling=True`:
  each step predicts the clean latent (x - sigma v) and re-noises it to the next sigma with fresh noise
  from torch's global RNG (seed it with `torch.manual_seed`), the sampler the student was trained
  with; T5 prompts of `max_sequence_length={max_sequence_length}` tokens, as in training"""
LORA_FOLDER = "lora"


class StudentStepsError(CheckpointError):
    """More sampling steps asked of an exported student than it was trained for (or fewer than 1)."""


def _student_adapter_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA generator's checkpoint weights (distill.lora.LoRAGenerator.state_dict) in peft's naming."""
    from distill.lora import peft_key

    prefix = "lora.weights."
    weights = {peft_key(k[len(prefix):]): v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise CheckpointError("checkpoint generator weights have no LoRA adapter ('lora.weights.' entries) although "
                              "the run's config has generator_lora_rank > 0")
    return weights


def _merge_lora(pipe, adapter: dict[str, torch.Tensor], settings, folder: str) -> None:
    """Write `adapter` as diffusers' LoRA file in `folder`, then load it into `pipe` and fuse it into
    the UNet, leaving a plain UNet (no LoRA layers) with the merged weights."""
    from distill.lora import save_diffusers_lora

    save_diffusers_lora(type(pipe), adapter, settings, folder)
    pipe.load_lora_weights(folder, adapter_name="student")
    pipe.fuse_lora(components=["unet"], lora_scale=1.0, adapter_names=["student"])
    pipe.unload_lora_weights()


def _student_unet_weights(state: dict[str, torch.Tensor], prefix: str = "unet.") -> dict[str, torch.Tensor]:
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise CheckpointError(f"checkpoint generator weights have no {prefix!r} entries")
    return weights


def _flow_export(pipe, weights: dict[str, torch.Tensor], config: TrainConfig) -> dict:
    """Put a flow student (distill.flow_student.FlowGenerator weights) and its stock scheduler into
    the teacher pipeline `pipe`; returns what the model card and STUDENT_INFO add. CheckpointError
    for what the stock pipeline cannot run."""
    from d2g.teacher.flow import FLUX, teacher_kind
    from distill.flow_student import flow_student_scheduler, pairs_max_sequence_length

    kind, steps = teacher_kind(pipe), config.objective_config.student_steps
    pipe.transformer.load_state_dict(_student_unet_weights(weights, "transformer."))
    pipe.scheduler = flow_student_scheduler(steps)
    guided = kind == FLUX and bool(getattr(pipe.transformer.config, "guidance_embeds", False))
    try:
        msl = pairs_max_sequence_length(config.data)
    except Exception:  # the card is documentation; an unreachable store must not block an export
        msl = None
    from d2g.teacher.flow import DEFAULT_MAX_SEQUENCE_LENGTH

    msl = msl or DEFAULT_MAX_SEQUENCE_LENGTH[kind]
    return {"guidance_scale": float(config.objective_config.flux_guidance) if guided else 0.0,
            "max_sequence_length": msl,
            "scheduler_note": FLOW_SCHEDULER_NOTE.format(max_sequence_length=msl), "steps_note": FLOW_STEPS_NOTE,
            "extra_call": f", max_sequence_length={msl}"}


MODEL_CARD = """---
library_name: diffusers
pipeline_tag: text-to-image
base_model: {base_model}
tags:
- d2g
- distillation
- {objective}
---

# {num_inference_steps}-step student of `{teacher}`

Distilled by d2g with the `{objective}` objective ({step} training steps, {weights} weights) from the
pair store `{data}` (fingerprint xxh3 `{fingerprint}`).

Run it with the settings it was trained for; the pipeline's defaults (50 steps, guidance 7.5) are
the teacher's, not the student's:

```python
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("{out}")
image = pipe(prompt, num_inference_steps={num_inference_steps}, guidance_scale={guidance_scale}{extra_call}).images[0]
```

- recommended `num_inference_steps`: {num_inference_steps} ({steps_note})
- recommended `guidance_scale`: {guidance_scale} (guidance is distilled into the student)
- scheduler: {scheduler_note}
- run: `{run}`, step {step}
{lora}"""

LORA_CARD = """
The student is also a LoRA adapter (rank {rank}, alpha {alpha}, on {targets}) of the teacher's UNet,
in `{folder}/`: load it into the stock teacher pipeline with the student's scheduler:

```python
from diffusers import DiffusionPipeline, LCMScheduler
pipe = DiffusionPipeline.from_pretrained("{teacher}")
pipe.load_lora_weights("{out}/{folder}")
pipe.scheduler = LCMScheduler.from_pretrained("{out}", subfolder="scheduler")
image = pipe(prompt, num_inference_steps={num_inference_steps}, guidance_scale={guidance_scale}).images[0]
```
"""


def _prepare_out(out_url: str):
    """The filesystem and path of an export folder that does not exist or is empty."""
    import fsspec

    from distill.train_config import check_local_out_folder

    # Before the checkpoint and teacher are loaded and the pipeline staged (minutes and GBs at SD
    # scale), and naming --out rather than a file inside it.
    check_local_out_folder(out_url, "export --out")
    fs, path = fsspec.core.url_to_fs(out_url)
    if fs.exists(path):
        if not fs.isdir(path):
            raise CheckpointError(f"export --out {out_url} is a file; give a folder")
        if fs.ls(path):
            raise CheckpointError(f"export --out {out_url} is not empty; give a new folder (nothing was written)")
    return fs, path


def _data_fingerprint(data_url: str) -> str:
    import xxhash

    from store import PairStore, parse_url

    try:
        fingerprint = PairStore(parse_url(data_url)[0]).read_fingerprint()
    except Exception:  # the card is documentation; an unreachable store must not block an export
        return "unavailable"
    return xxhash.xxh3_64_hexdigest(json.dumps(fingerprint, sort_keys=True).encode()) if fingerprint else "none"


def export_student(run_url: str, out_dir: str, step: int | None = None, use_ema: bool = True) -> dict:
    """Write the student of run `run_url` (checkpoint `step`, default the latest complete one; its
    EMA weights when `use_ema` and saved) as a diffusers pipeline folder at `out_dir` (any fsspec
    URL; it must not exist or be empty), with a model card (README.md) and STUDENT_INFO.

    Returns what was exported: run, step, weights, out, and `skipped_incomplete_step` when a newer
    checkpoint exists but is incomplete. CheckpointError if there is no such complete checkpoint.
    """
    import tempfile

    checkpoints = CheckpointStore(run_url)
    latest = checkpoints.latest()
    step = step if step is not None else latest
    if step is None:
        raise CheckpointError(f"{run_url} has no complete checkpoint to export")
    if step not in checkpoints.complete_steps():
        raise CheckpointError(f"{run_url} has no complete checkpoint at step {step}; complete: "
                              f"{checkpoints.complete_steps()}")
    newer_incomplete = [s for s in checkpoints.incomplete_steps() if s > step]
    fs, out_path = _prepare_out(out_dir)
    weights, _, state = checkpoints.load(step, ["generator", "ema"])
    config = TrainConfig(**state["config"])
    source = "ema" if use_ema and "ema" in weights else "generator"
    pipe = load_teacher(config.teacher, device="cpu", drop_t5=config.teacher_drop_t5)
    lora = config.memory().generator_lora
    student_steps = config.objective_config.student_steps
    flow = getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None
    adapter = None
    extra = {"guidance_scale": 0.0, "scheduler_note": UNET_SCHEDULER_NOTE.format(steps=student_steps),
             "steps_note": UNET_STEPS_NOTE, "extra_call": ""}
    if flow:
        extra = _flow_export(pipe, weights[source], config)
    elif lora is None:
        pipe.unet.load_state_dict(_student_unet_weights(weights[source]))
    else:
        adapter = _student_adapter_weights(weights[source])
    if not flow:
        pipe.scheduler = student_scheduler(dict(pipe.scheduler.config), student_steps)
    guidance_scale = extra["guidance_scale"]
    info = {"run": run_url, "step": step, "weights": source, "teacher": config.teacher,
            "objective": config.objective, "num_inference_steps": student_steps, "guidance_scale": guidance_scale,
            "student_steps": student_steps, "data": config.data, "out": out_dir,
            "data_fingerprint_xxh3": _data_fingerprint(config.data)}
    if "max_sequence_length" in extra:
        info["max_sequence_length"] = extra["max_sequence_length"]
    if newer_incomplete and step == latest:
        info["skipped_incomplete_step"] = newer_incomplete[-1]
    lora_card = ""
    if lora is not None:
        info["lora"] = {"folder": LORA_FOLDER, "rank": lora.rank, "alpha": lora.alpha, "targets": list(lora.targets)}
        lora_card = LORA_CARD.format(rank=lora.rank, alpha=lora.alpha, targets=", ".join(lora.targets),
                                     folder=LORA_FOLDER, teacher=config.teacher, out=out_dir,
                                     num_inference_steps=student_steps, guidance_scale=0.0)
    base_model = config.teacher if config.teacher not in ("shapes", "shapes-xl") else f"d2g/{config.teacher}"
    card = MODEL_CARD.format(base_model=base_model, teacher=config.teacher, objective=config.objective, step=step,
                             weights=source, data=config.data, fingerprint=info["data_fingerprint_xxh3"],
                             out=out_dir, num_inference_steps=student_steps, guidance_scale=guidance_scale,
                             run=run_url, lora=lora_card, scheduler_note=extra["scheduler_note"],
                             steps_note=extra["steps_note"], extra_call=extra["extra_call"])
    with tempfile.TemporaryDirectory(prefix="d2g-export-") as staging:
        if adapter is not None:
            _merge_lora(pipe, adapter, lora, os.path.join(staging, LORA_FOLDER))
        pipe.save_pretrained(staging)
        Path(staging, STUDENT_INFO).write_text(json.dumps(info, indent=2))
        Path(staging, "README.md").write_text(card)
        # Written aside, then copied: a local folder or an object store gets the same files.
        fs.makedirs(out_path, exist_ok=True)
        fs.put(staging.rstrip("/") + "/", out_path, recursive=True)
    return info


def load_student(model_dir: str, device: str = "cpu"):
    """The exported pipeline, loaded like a teacher (d2g.teacher.loading: frozen, progress bars
    off; TeacherError naming the folder if it is not a pipeline), on `device`."""
    # An absolute path: a local folder named like a built-in teacher alias ("shapes") must not
    # load that teacher instead.
    return load_teacher(os.path.abspath(model_dir) if os.path.isdir(model_dir) else model_dir, device=device)


def recommended_steps(model_dir: str) -> int:
    """The sampling steps an exported student was trained for: STUDENT_INFO's
    `num_inference_steps` (1 for exports that predate few-step students or have no STUDENT_INFO)."""
    import fsspec

    try:
        with fsspec.open(posixpath.join(model_dir.rstrip("/"), STUDENT_INFO) if "://" in model_dir
                         else os.path.join(model_dir, STUDENT_INFO), "r") as f:
            info = json.load(f)
    except (FileNotFoundError, ValueError):
        return 1
    return int(info.get("num_inference_steps", 1))


def check_steps(pipe, steps: int) -> None:
    """StudentStepsError (a one-line CLI error) unless the exported student in `pipe` can sample in
    `steps` steps: 1 to the steps it was trained for (its scheduler's original_inference_steps)."""
    trained = _trained_steps(pipe)
    if not 1 <= steps <= trained:
        raise StudentStepsError(f"--steps {steps}: this student was trained for {trained} step"
                                f"{'s' if trained > 1 else ''}; give 1 to {trained}")


def _is_flow(pipe) -> bool:
    return getattr(pipe, "unet", None) is None and getattr(pipe, "transformer", None) is not None


def _trained_steps(pipe) -> int:
    """The steps the exported student in `pipe` was trained for: its LCM scheduler's (UNet), or
    STUDENT_INFO's in the folder it was loaded from (flow students: their stock scheduler does not
    record it)."""
    from distill.generator import trained_steps_of

    if not _is_flow(pipe):
        return trained_steps_of(pipe.scheduler)
    folder = getattr(pipe.config, "_name_or_path", None)
    return recommended_steps(str(folder)) if folder else 1


@torch.no_grad()
def _flow_student_latents(pipe, prompts: list[str], noise: torch.Tensor, steps: int,
                          max_sequence_length: int | None, generator: Generators) -> torch.Tensor:
    from d2g.teacher.flow import teacher_kind
    from distill.flow_student import (
        FlowSchedule,
        FlowTextConditioner,
        flow_few_step_sample,
        flow_velocity,
        sampler_draw,
    )

    kind = teacher_kind(pipe)
    trained = _trained_steps(pipe)
    guidance = _exported_info(pipe).get("guidance_scale", 0.0)
    cond = FlowTextConditioner(pipe, max_sequence_length, guidance or 0.0)({PROMPT: prompts, NOISE: noise})
    grid = FlowSchedule(kind).student_grid(steps, trained)
    return flow_few_step_sample(lambda x, s: flow_velocity(pipe.transformer, kind, x, s, cond), noise, grid,
                                sampler_draw(kind, generator))


def _exported_info(pipe) -> dict:
    folder = getattr(pipe.config, "_name_or_path", None)
    path = os.path.join(str(folder), STUDENT_INFO) if folder else None
    if path is None or not os.path.isfile(path):
        return {}
    return json.loads(Path(path).read_text())


@torch.no_grad()
def student_latents(pipe, prompts: list[str], noise: torch.Tensor, steps: int | None = None,
                    generator: Generators = None, max_sequence_length: int | None = None) -> torch.Tensor:
    """Prompt to latent in `steps` UNet evaluations (default: the steps the student was trained
    for), with d2g's own sampler (distill.generator.few_step_sample, not the pipeline's loop):
    `prompts` (one per sample) and `noise` [B, C, h, w] to latents [B, C, h, w]. `generator` (one
    per sample, or one) draws the between-step noise as the exported pipeline's `generator` would;
    None: generators keyed by each sample's starting noise (distill.generator.noise_keyed_generators),
    so evaluation is deterministic and independent of batching. Flow (SD3/FLUX) students run
    distill.flow_student's sampler instead, with T5 prompts of `max_sequence_length` tokens (None:
    the stock pipeline's default) and their between-step noise from `generator`, or, when None,
    from torch's global RNG as their stock pipeline draws it (which ignores `generator=` between
    steps)."""
    from distill.conditioning import TextConditioner
    from distill.generator import NoiseSchedule, few_step_sample, noise_keyed_generators, trained_steps_of

    if _is_flow(pipe):
        steps = _trained_steps(pipe) if steps is None else steps
        check_steps(pipe, steps)
        return _flow_student_latents(pipe, prompts, noise, steps, max_sequence_length, generator)
    trained = trained_steps_of(pipe.scheduler)
    steps = trained if steps is None else steps
    check_steps(pipe, steps)
    cond = TextConditioner(pipe)({PROMPT: prompts, NOISE: noise}, tuple(noise.shape[-2:]))
    schedule = NoiseSchedule(pipe.scheduler)
    grid = schedule.student_grid(steps, trained)
    if generator is None and steps > 1:
        generator = noise_keyed_generators(noise)

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return schedule.to_x0(pipe.unet(x, t, **cond.unet_kwargs()).sample, x, t)

    return few_step_sample(denoise, schedule, noise, grid, generator)


def _next_free_numbers(fs, folder: str, stem: str, count: int) -> list[int]:
    """`count` file numbers after the highest STEM-NNN.png already in `folder` (never overwrite)."""
    import re

    try:
        names = [posixpath.basename(p) for p in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        names = []
    taken = [int(m.group(1)) for n in names if (m := re.fullmatch(rf"{re.escape(stem)}-(\d+)\.png", n))]
    first = max(taken) + 1 if taken else 0
    return list(range(first, first + count))


def save_pngs(images: torch.Tensor, folder: str, stem: str = "image", metadata: list[dict] | None = None) -> list[str]:
    """Images [N, 3, H, W] in [0, 1] as FOLDER/STEM-NNN.png (any fsspec URL), numbered after the
    files already there so nothing is overwritten; `metadata[i]` goes into image i's PNG text
    chunks. Returns the paths."""
    import io

    import fsspec
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    fs, root = fsspec.core.url_to_fs(folder)
    fs.makedirs(root, exist_ok=True)
    paths = []
    for image, number in zip(images, _next_free_numbers(fs, root, stem, len(images)), strict=True):
        array = (image.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
        text = PngInfo()
        for key, value in (metadata[len(paths)] if metadata else {}).items():
            text.add_text(key, str(value))
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", pnginfo=text)
        path = posixpath.join(root, f"{stem}-{number:03d}.png")
        with fs.open(path, "xb" if "s3" in str(fs.protocol) else "wb") as f:
            f.write(buffer.getvalue())
        paths.append(folder.rstrip("/") + "/" + posixpath.basename(path) if "://" in folder else path)
    return paths


def generate_pngs(model_dir: str, prompts: list[str], num: int, seed: int, out: str,
                  steps: int | None = None) -> list[str]:
    """`num` images per prompt from an exported student in `steps` steps (default: the steps it
    was trained for, `recommended_steps`), saved by `save_pngs` with their prompt, seed, noise
    index, steps and model recorded in the PNG. Image i's starting noise is
    d2g.teacher.noise.sample_noise(seed, i), as in pairgen, and its between-step noise continues
    the same generator (distill.generator.seeded_noise), so (seed, i) reproduces image i, also in a
    stock pipeline given `generator=torch.Generator().manual_seed(sample_seed(seed, i))`.
    StudentStepsError for more steps than the student was trained for."""
    from d2g.teacher.vae import decode, latent_shape, to_unit_range
    from distill.generator import seeded_noise

    pipe = load_student(model_dir)
    steps = recommended_steps(model_dir) if steps is None else steps
    check_steps(pipe, steps)
    texts = [p for p in prompts for _ in range(num)]
    noise, generators = seeded_noise(seed, list(range(len(texts))), latent_shape(pipe))
    with torch.no_grad():
        images = to_unit_range(decode(pipe.vae, student_latents(pipe, texts, noise, steps, generators)))
    metadata = [{"prompt": t, "seed": seed, "noise_index": i, "steps": steps, "model": os.path.abspath(model_dir)
                 if "://" not in model_dir else model_dir, "generator": "d2g"} for i, t in enumerate(texts)]
    return save_pngs(images, out, metadata=metadata)
