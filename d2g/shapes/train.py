"""Train the shapes teacher and its evaluator, stage by stage, resumably.

    python -m d2g.shapes.train --stage all --workdir /tmp/shapes --out d2g/shapes/weights

Stages (each resumable from its own checkpoint in --workdir with --resume):
  evaluator  the attribute CNN on real procedural images -> OUT/evaluator
  vae        AutoencoderKL on procedural images -> WORKDIR/vae
  latents    encode the training set once with the VAE; scaling factor = 1/std of latents (as SD)
  unet       epsilon-prediction UNet on the stored latents, text through a frozen random CLIP
             encoder, 10% empty captions for classifier-free guidance, EMA weights exported
             -> OUT/teacher (a StableDiffusionPipeline)

--layout sdxl trains the SDXL-layout teacher instead (OUT/teacher-xl, a StableDiffusionXLPipeline):
a second text encoder with a projection, pooled embeddings and size/crop time ids. With
--components-from OUT/teacher it reuses that teacher's VAE (and scaling factor) and first text
encoder, so only the latents and unet stages run:

    python -m d2g.shapes.train --layout sdxl --components-from d2g/shapes/weights/teacher \
        --stage latents --latent-items 32768 --workdir /tmp/shapes-xl
    python -m d2g.shapes.train --layout sdxl --stage unet --steps 6000 --workdir /tmp/shapes-xl

--layout sd3 trains the SD3-layout, flow-matching teacher instead (OUT/teacher-sd3, alias shapes-sd3,
a StableDiffusion3Pipeline without T5): an MMDiT (SD3Transformer2DModel, patch 2 on the VAE's latents)
trained with the rectified-flow loss, x_t = (1 - s) x0 + s eps, target v = eps - x0, s drawn
logit-normal as SD3 does; sampled by a pinned FlowMatchEulerDiscreteScheduler (shift 1). It reuses
the VAE and first text encoder of --components-from (plus a frozen random projection, which SD3's
first encoder needs) and the SDXL layout's second encoder; its T5 is a zero encoder (the zeros the
pipeline uses without T5, so a plain from_pretrained loads it), --max-sequence-length tokens of it
(default 256, the pipeline's own default):

    python -m d2g.shapes.train --layout sd3 --components-from d2g/shapes/weights/teacher \
        --stage latents --latent-items 32768 --workdir /tmp/shapes-sd3
    python -m d2g.shapes.train --layout sd3 --stage unet --workdir /tmp/shapes-sd3   # 6,500 steps, batch 32

Batches and noise of step s are pure functions of (seed, s), so a resumed run replays exactly
what an uninterrupted run would have done.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from d2g.shapes import evaluator as ev
from d2g.shapes import models, world
from store.atomic import write_local_file

DEFAULT_STEPS = {"evaluator": 1200, "vae": 2500, "unet": 7500}
BATCH = {"evaluator": 128, "vae": 64, "unet": 64}
LR = {"evaluator": 2e-3, "vae": 1e-3, "unet": 1e-3}
LATENT_ITEMS = 32768
CFG_DROPOUT = 0.1
EMA_DECAY = 0.999
KL_WEIGHT = 1e-6  # SD's KL weight: latents stay close to deterministic codes
# World seeds: training uses seed 0; evaluation draws real images from other seeds.
TRAIN_WORLD_SEED = 0
EVALUATOR_WORLD_SEED = 7
STAGES = ("evaluator", "vae", "latents", "unet")
# The SD3 layout's transformer (the "unet" stage of --layout sd3): a linear warm-up, then the constant
# rate the UNets use. Its step costs 2.8x the UNet's at batch 64 (CPU time measured side by side: the
# 256 zero T5 tokens dominate attention), so half the batch: 6,500 x 32 = 208k samples (the UNet saw
# 7,500 x 64 = 480k), 0.27-0.32 s a step, about 32 minutes, on two free cores. The shipped teacher
# is the EMA at step 6,500: 94.9% every attribute right at 25 Euler steps, above the 90% asked.
SD3_STEPS = 6500
SD3_BATCH = 32
SD3_WARMUP = 500


def _step_generator(seed: int, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + STAGES.index(stage) * 100_000_007 + step)


def _cosine(step: int, steps: int, floor: float = 0.05, warmup: int = 100) -> float:
    """LR multiplier: linear warm-up, cosine decay to `floor`. A pure function of the step, so a
    resumed run (with the same --steps) follows exactly the same schedule."""
    if step < warmup:
        return (step + 1) / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _atomic_save(obj, path: Path) -> None:
    # A crash mid-write leaves the previous checkpoint intact.
    write_local_file(path, lambda tmp: torch.save(obj, tmp))


def _load_checkpoint(path: Path, resume: bool):
    if resume and path.exists():
        return torch.load(path, weights_only=True)
    return None


def _loop(stage: str, steps: int, start: int, step_fn, save_fn, every: int, stop_after: int | None = None) -> dict:
    """Run step_fn(step) -> loss for start..steps-1 with a progress bar, checkpointing every `every`.

    `stop_after` ends the run early at that step (checkpoint saved, schedule still sized for `steps`),
    as an interruption would; the summary then says stopped_early and the stage does not export."""
    end = min(steps, stop_after) if stop_after else steps
    t0, losses = time.time(), []
    bar = tqdm(range(start, end), desc=stage, initial=start, total=steps, mininterval=5, file=sys.stdout)
    for step in bar:
        loss = step_fn(step)
        losses.append(loss)
        if (step + 1) % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
        if (step + 1) % every == 0 or step + 1 == end:
            save_fn(step + 1)
            print(f"[{stage}] step {step + 1}/{steps} loss(last 50) "
                  f"{sum(losses[-50:]) / max(1, len(losses[-50:])):.4f} checkpoint saved", flush=True)
    bar.close()
    seconds = time.time() - t0
    summary = {"stage": stage, "steps": steps, "started_at_step": start, "ended_at_step": max(start, end),
               "stopped_early": end < steps, "seconds": round(seconds, 1),
               "final_loss": sum(losses[-100:]) / max(1, len(losses[-100:])) if losses else None}
    print(f"[{stage}] summary: {json.dumps(summary)}", flush=True)
    return summary


# ---- evaluator -------------------------------------------------------------------------------

def train_evaluator(args) -> dict:
    """Stage evaluator: train the attribute CNN, check it on held-out-combination images and save
    it to OUT/evaluator; returns the stage summary."""
    torch.manual_seed(args.seed)
    model = ev.ShapesCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=LR["evaluator"], weight_decay=1e-4)
    ckpt_path = args.workdir / "evaluator.ckpt"
    start = 0
    if (state := _load_checkpoint(ckpt_path, args.resume)) is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    steps, bs = args.steps or DEFAULT_STEPS["evaluator"], BATCH["evaluator"]

    # The judge must be right on every combination the teacher is asked for, including the
    # teacher's held-out ones (trained on the training combinations only, it reached just 90% on
    # them: shape does not generalise compositionally from 1,500 steps). So a quarter of each batch
    # comes from the held-out split; the *teacher* never sees those combinations.
    held = bs // 4

    def step_fn(step: int) -> float:
        _set_lr(opt, LR["evaluator"] * _cosine(step, steps, warmup=0))
        images, _, attrs = world.batch(EVALUATOR_WORLD_SEED, step * bs, bs - held, "train")
        h_images, _, h_attrs = world.batch(EVALUATOR_WORLD_SEED, step * held, held, "heldout")
        x = torch.cat([world.to_tensor(images), world.to_tensor(h_images)])
        x = ev.augment(x, _step_generator(args.seed, "evaluator", step))
        _, logits = model(x)
        labels = world.labels_tensor(attrs + h_attrs)
        loss = sum(F.cross_entropy(lg, labels[:, i]) for i, lg in enumerate(logits))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    def save_fn(step: int) -> None:
        _atomic_save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt_path)

    summary = _loop("evaluator", steps, start, step_fn, save_fn, args.checkpoint_every, args.stop_after)
    if summary["stopped_early"]:
        return summary
    model.eval()
    config = {"widths": [32, 64, 128], "feature_dim": 128,
              "attributes": {k: list(v) for k, v in world.ATTRIBUTES.items()},
              "trained": {"steps": steps, "batch": bs, "lr": LR["evaluator"], "seed": args.seed,
                          "world_seed": EVALUATOR_WORLD_SEED, "splits": "train + 1/4 heldout",
                          "lr_schedule": "cosine to 5%"}}
    judge = ev.Evaluator(model, config)
    images, _, attrs = world.batch(1234, 0, args.check_items, "heldout")
    summary["heldout_accuracy"] = judge.attribute_accuracy(images, attrs)
    print(f"[evaluator] accuracy on {args.check_items} held-out-combination images: {summary['heldout_accuracy']}")
    judge.save(args.out / "evaluator")
    return summary


# ---- vae -------------------------------------------------------------------------------------

def train_vae(args) -> dict:
    """Stage vae: train the AutoencoderKL on world images and save it to WORKDIR/vae; returns the
    stage summary."""
    vae = models.build_vae(args.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=LR["vae"], weight_decay=0.0)
    ckpt_path = args.workdir / "vae.ckpt"
    start = 0
    if (state := _load_checkpoint(ckpt_path, args.resume)) is not None:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    steps, bs = args.steps or DEFAULT_STEPS["vae"], BATCH["vae"]
    vae.train()

    def step_fn(step: int) -> float:
        _set_lr(opt, LR["vae"] * _cosine(step, steps))
        images, _, _ = world.batch(TRAIN_WORLD_SEED, step * bs, bs, "train")
        x = world.to_tensor(images)
        posterior = vae.encode(x).latent_dist
        gen = _step_generator(args.seed, "vae", step)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.1 * F.l1_loss(recon, x) + KL_WEIGHT * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        return loss.item()

    def save_fn(step: int) -> None:
        _atomic_save({"model": vae.state_dict(), "opt": opt.state_dict(), "step": step}, ckpt_path)

    summary = _loop("vae", steps, start, step_fn, save_fn, args.checkpoint_every, args.stop_after)
    if summary["stopped_early"]:
        return summary
    vae.eval().save_pretrained(args.workdir / "vae", safe_serialization=True)
    return summary


# ---- latents ---------------------------------------------------------------------------------

@torch.no_grad()
def encode_latents(args) -> dict:
    """Stage latents: encode the training images once (posterior mean and std), set the latent
    scaling factor, save the tokenizer and text encoder(s) and every caption's embedding, all to
    WORKDIR (latents.pt holds the data); returns the stage summary."""
    from diffusers import AutoencoderKL

    t0 = time.time()
    vae = AutoencoderKL.from_pretrained(_component(args, "vae")).eval()
    if args.components_from:  # the unet stage's export then finds every component in the workdir
        vae.save_pretrained(args.workdir / "vae", safe_serialization=True)
    n, chunk = args.latent_items, 512
    means, stds, caption_ids, captions = [], [], [], {}
    for start in tqdm(range(0, n, chunk), desc="latents", mininterval=5, file=sys.stdout):
        images, texts, _ = world.batch(TRAIN_WORLD_SEED, start, min(chunk, n - start), "train")
        posterior = vae.encode(world.to_tensor(images)).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
        caption_ids += [captions.setdefault(t, len(captions)) for t in texts]
    mean, std = torch.cat(means), torch.cat(stds)
    gen = torch.Generator().manual_seed(args.seed)
    sampled = mean + std * torch.randn(mean.shape, generator=gen)
    # SD's latent scaling: 1 / std of the (sampled) latents of the training images; a reused VAE
    # keeps the factor its teacher was trained with.
    scaling_factor = vae.config.scaling_factor if args.components_from else float(1.0 / sampled.std())

    if args.components_from and (_component(args, "tokenizer") / "tokenizer_config.json").exists():
        from transformers import CLIPTokenizer

        # The reused text encoder's own tokenizer (the same vocabulary, without re-deriving it).
        tokenizer = CLIPTokenizer.from_pretrained(_component(args, "tokenizer"))
        tokenizer.save_pretrained(args.workdir / "tokenizer")
    else:
        tokenizer = models.build_tokenizer(args.workdir / "tokenizer")
    if args.components_from:
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel.from_pretrained(_component(args, "text_encoder")).eval()
    else:
        text_encoder = models.build_text_encoder(tokenizer, args.seed)
    if args.layout == "sd3":  # SD3's first encoder has a projection: the same weights plus a random one
        text_encoder = models.with_projection(text_encoder, args.seed + 2)
    text_encoder.save_pretrained(args.workdir / "text_encoder", safe_serialization=True)
    texts = [""] + list(captions)  # row 0: the empty prompt, used for classifier-free guidance
    encoded = {"mean": mean, "std": std, "caption_ids": torch.tensor(caption_ids) + 1,
               "scaling_factor": scaling_factor, "captions": texts, "layout": args.layout}
    chunks = [texts[i:i + 256] for i in range(0, len(texts), 256)]
    if args.layout == "sd3":
        text_encoder_2 = models.build_text_encoder_2(tokenizer, args.seed + 1)
        text_encoder_2.save_pretrained(args.workdir / "text_encoder_2", safe_serialization=True)
        transformer = models.build_transformer(args.seed, vae.config.latent_channels)
        tokenizer_3, text_encoder_3 = models.build_zero_t5(args.workdir / "tokenizer_3")
        text_encoder_3.save_pretrained(args.workdir / "text_encoder_3", safe_serialization=True)
        pipe = models.assemble_sd3_pipeline(vae, text_encoder, text_encoder_2, tokenizer, transformer,
                                            text_encoder_3, tokenizer_3)
        pairs = [models.encode_prompts_sd3(pipe, chunk) for chunk in chunks]
        encoded["embeddings"] = torch.cat([e for e, _ in pairs])
        encoded["pooled"] = torch.cat([p for _, p in pairs])
    elif args.layout == "sdxl":
        text_encoder_2 = models.build_text_encoder_2(tokenizer, args.seed + 1)
        text_encoder_2.save_pretrained(args.workdir / "text_encoder_2", safe_serialization=True)
        pipe = models.assemble_pipeline(vae, text_encoder, tokenizer, models.build_unet(args.seed, "sdxl"),
                                        text_encoder_2)
        pairs = [models.encode_prompts_xl(pipe, chunk) for chunk in chunks]
        encoded["embeddings"] = torch.cat([e for e, _ in pairs])
        encoded["pooled"] = torch.cat([p for _, p in pairs])
    else:
        encoded["embeddings"] = torch.cat([models.encode_prompts(tokenizer, text_encoder, c) for c in chunks])
    _atomic_save(encoded, args.workdir / "latents.pt")
    summary = {"stage": "latents", "items": n, "unique_captions": len(captions),
               "scaling_factor": scaling_factor, "seconds": round(time.time() - t0, 1)}
    print(f"[latents] summary: {json.dumps(summary)}", flush=True)
    return summary


# ---- unet ------------------------------------------------------------------------------------

def train_unet(args) -> dict:
    """Stage unet: train the epsilon-prediction UNet on the stored latents (captions dropped for
    guidance), keep EMA weights and export them as the teacher pipeline; returns the stage summary."""
    data = torch.load(args.workdir / "latents.pt", weights_only=True)
    # latents.pt files written before the SD3 layout have no "layout" entry: sdxl ones hold pooled embeddings.
    encoded_for = data.get("layout", "sdxl" if "pooled" in data else "sd")
    if encoded_for != args.layout:
        raise SystemExit(f"{args.workdir / 'latents.pt'} was encoded for --layout {encoded_for}; "
                         f"re-run the latents stage with --layout {args.layout}")
    if args.layout == "sd3":
        return train_transformer(args, data)
    mean, std, embeddings = data["mean"], data["std"], data["embeddings"]
    caption_ids, scale = data["caption_ids"], data["scaling_factor"]
    pooled = data.get("pooled")
    n = len(mean)
    unet = models.build_unet(args.seed, args.layout)
    ema = copy.deepcopy(unet).requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=LR["unet"], weight_decay=1e-2)
    ckpt_path = args.workdir / "unet.ckpt"
    start = 0
    if (state := _load_checkpoint(ckpt_path, args.resume)) is not None:
        unet.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    steps, bs = args.steps or DEFAULT_STEPS["unet"], BATCH["unet"]
    if args.export_only:
        if state is None:
            raise SystemExit(f"--export-only needs a checkpoint at {ckpt_path} (and --resume)")
        steps = start  # export the checkpoint's EMA weights as they are, no further steps
    alphas = models.alphas_cumprod()
    # SDXL's micro-conditioning as its pipeline sends it by default: original = target = image size, no crop.
    time_ids = torch.tensor([[world.IMAGE_SIZE, world.IMAGE_SIZE, 0, 0, world.IMAGE_SIZE, world.IMAGE_SIZE]],
                            dtype=torch.float32)
    unet.train()

    def step_fn(step: int) -> float:
        gen = _step_generator(args.seed, "unet", step)
        idx = torch.randint(0, n, (bs,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        cond = caption_ids[idx].clone()
        cond[torch.rand(bs, generator=gen) < CFG_DROPOUT] = 0
        t = torch.randint(0, len(alphas), (bs,), generator=gen)
        noise = torch.randn(latents.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        extra = {}
        if pooled is not None:
            extra["added_cond_kwargs"] = {"text_embeds": pooled[cond], "time_ids": time_ids.expand(bs, -1)}
        pred = unet(noisy, t, encoder_hidden_states=embeddings[cond], **extra).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        # Warm-up of the EMA decay so early weights do not dominate a short run.
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        return loss.item()

    def save_fn(step: int) -> None:
        _atomic_save({"model": unet.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                      "step": step}, ckpt_path)

    summary = _loop("unet", steps, start, step_fn, save_fn, args.checkpoint_every, args.stop_after)
    if summary["stopped_early"]:
        return summary
    export_teacher(args, ema, scale)
    return summary


def logit_normal_sigmas(n: int, generator: torch.Generator) -> torch.Tensor:
    """SD3's training noise levels: sigma = sigmoid(u), u ~ N(0, 1) (logit-normal, mean 0, scale 1),
    which weights the middle of the path, where the velocity is hardest to predict."""
    return torch.sigmoid(torch.randn(n, generator=generator))


def rectified_flow_loss(transformer, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor,
                        context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """The rectified-flow (flow-matching) loss: MSE between the transformer's velocity at
    x_t = (1 - sigma) x0 + sigma noise and the path's velocity noise - x0. The transformer is
    called as StableDiffusion3Pipeline calls it: timestep = sigma * 1000."""
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    velocity = transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=context,
                           pooled_projections=pooled, return_dict=False)[0]
    return F.mse_loss(velocity, noise - x0)


def train_transformer(args, data: dict) -> dict:
    """Stage unet of --layout sd3: train the SD3 transformer with `rectified_flow_loss` on the
    stored latents (captions dropped for guidance; the CLIP tokens followed by max_sequence_length
    zero tokens, as the pipeline without T5 passes them), keep EMA weights and export them as the
    StableDiffusion3Pipeline; returns the stage summary."""
    mean, std, embeddings, pooled = data["mean"], data["std"], data["embeddings"], data["pooled"]
    caption_ids, scale = data["caption_ids"], data["scaling_factor"]
    n, msl = len(mean), args.max_sequence_length
    transformer = models.build_transformer(args.seed, mean.shape[1])
    ema = copy.deepcopy(transformer).requires_grad_(False)
    opt = torch.optim.AdamW(transformer.parameters(), lr=LR["unet"], weight_decay=1e-2)
    ckpt_path = args.workdir / "transformer.ckpt"
    start = 0
    if (state := _load_checkpoint(ckpt_path, args.resume)) is not None:
        if int(state["max_sequence_length"]) != msl:
            raise SystemExit(f"{ckpt_path} was trained with --max-sequence-length {int(state['max_sequence_length'])}, "
                             f"not {msl}; give that value or another --workdir")
        transformer.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    steps, bs = args.steps or SD3_STEPS, args.batch_size or SD3_BATCH
    if args.export_only:
        if state is None:
            raise SystemExit(f"--export-only needs a checkpoint at {ckpt_path} (and --resume)")
        steps = start
    zeros = torch.zeros(bs, msl, embeddings.shape[-1])  # the pipeline's stand-in for T5 tokens
    transformer.train()

    def step_fn(step: int) -> float:
        _set_lr(opt, LR["unet"] * min(1.0, (step + 1) / SD3_WARMUP))
        gen = _step_generator(args.seed, "unet", step)
        idx = torch.randint(0, n, (bs,), generator=gen)
        latents = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scale
        cond = caption_ids[idx].clone()
        cond[torch.rand(bs, generator=gen) < CFG_DROPOUT] = 0
        sigma = logit_normal_sigmas(bs, gen)
        noise = torch.randn(latents.shape, generator=gen)
        loss = rectified_flow_loss(transformer, latents, noise, sigma, torch.cat([embeddings[cond], zeros], dim=1),
                                   pooled[cond])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), transformer.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        return loss.item()

    def save_fn(step: int) -> None:
        _atomic_save({"model": transformer.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                      "step": step, "max_sequence_length": msl}, ckpt_path)

    summary = _loop("unet", steps, start, step_fn, save_fn, args.checkpoint_every, args.stop_after)
    summary.update(layout="sd3", max_sequence_length=msl)
    if summary["stopped_early"]:
        return summary
    export_teacher(args, ema, scale)
    return summary


def _component(args, name: str) -> Path:
    """Where a shared component is read by the latents stage: the --components-from teacher, else this workdir."""
    return (args.components_from or args.workdir) / name


TEACHER_FOLDERS = {"sd": "teacher", "sdxl": "teacher-xl", "sd3": "teacher-sd3"}


def export_teacher(args, unet, scaling_factor: float) -> Path:
    """Assemble the pipeline and save it (safetensors) to OUT/teacher (OUT/teacher-xl for sdxl,
    OUT/teacher-sd3 for sd3, where `unet` is the transformer)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    vae = AutoencoderKL.from_pretrained(args.workdir / "vae")
    vae.register_to_config(scaling_factor=scaling_factor)
    tokenizer = CLIPTokenizer.from_pretrained(args.workdir / "tokenizer")
    text_encoder_2 = None
    if args.layout in ("sdxl", "sd3"):
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(args.workdir / "text_encoder_2")
    if args.layout == "sd3":
        from transformers import T5EncoderModel, T5TokenizerFast

        text_encoder = CLIPTextModelWithProjection.from_pretrained(args.workdir / "text_encoder")
        pipe = models.assemble_sd3_pipeline(vae, text_encoder, text_encoder_2, tokenizer, unet.eval(),
                                            T5EncoderModel.from_pretrained(args.workdir / "text_encoder_3"),
                                            T5TokenizerFast.from_pretrained(args.workdir / "tokenizer_3"))
    else:
        text_encoder = CLIPTextModel.from_pretrained(args.workdir / "text_encoder")
        pipe = models.assemble_pipeline(vae, text_encoder, tokenizer, unet.eval(), text_encoder_2)
    out = args.out / TEACHER_FOLDERS[args.layout]
    pipe.save_pretrained(out, safe_serialization=True)
    print(f"[unet] teacher pipeline written to {out}", flush=True)
    return out


def parse_args(argv=None):
    """The command line, with combinations that cannot work (e.g. --steps with --stage all) refused."""
    p = argparse.ArgumentParser(prog="python -m d2g.shapes.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, choices=STAGES + ("all",))
    p.add_argument("--workdir", required=True, type=Path, help="checkpoints and intermediate files")
    p.add_argument("--out", type=Path, default=None,
                   help="where teacher/ and evaluator/ are written (default: WORKDIR/weights; give the packaged "
                   "d2g/shapes/weights explicitly to replace the shipped teacher)")
    p.add_argument("--layout", choices=models.LAYOUTS, default="sd",
                   help="sd: the SD1.5-layout teacher (OUT/teacher); sdxl: the SDXL-layout one (OUT/teacher-xl); "
                        "sd3: the SD3-layout flow-matching one (OUT/teacher-sd3)")
    p.add_argument("--max-sequence-length", type=int, default=models.SD3_MAX_SEQUENCE_LENGTH,
                   help="--layout sd3, unet stage: the zero T5 tokens the pipeline appends without a T5 encoder, "
                        f"trained for (default {models.SD3_MAX_SEQUENCE_LENGTH}, the pipeline's default "
                        "max_sequence_length; sample with the same value)")
    p.add_argument("--components-from", type=Path, default=None,
                   help="a trained shapes teacher folder whose VAE and first text encoder are reused "
                        "(the vae stage is then not needed)")
    p.add_argument("--resume", action="store_true", help="continue from WORKDIR/<stage>.ckpt if it exists")
    p.add_argument("--steps", type=int, default=None,
                   help=f"total steps of the stage (defaults {DEFAULT_STEPS}; --layout sd3's unet {SD3_STEPS}); "
                        "with --resume, "
                        "a larger value continues a finished run")
    p.add_argument("--export-only", action="store_true",
                   help="unet stage: write the pipeline from the checkpoint's EMA weights without training "
                        "(safe while a training run is writing checkpoints: they are replaced atomically)")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop at this step with a checkpoint and no export (an interruption on purpose); "
                        "continue later with --resume")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"--layout sd3, unet stage: samples per step (default {SD3_BATCH})")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--latent-items", type=int, default=LATENT_ITEMS,
                   help=f"latents stage: training images encoded once (default {LATENT_ITEMS}); the unet "
                        "stage trains on these")
    p.add_argument("--check-items", type=int, default=2000,
                   help="real held-out images the trained evaluator is checked on at the end of its stage")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    args = p.parse_args(argv)
    if args.stage == "all" and args.steps is not None:
        p.error("--steps applies to one stage; run the stages one by one to change them")
    if args.components_from and not (args.components_from / "vae" / "config.json").exists():
        p.error(f"--components-from {args.components_from}: no vae/config.json there (expected a shapes teacher folder)")
    if args.layout in ("sdxl", "sd3") and args.stage == "all":
        p.error(f"--layout {args.layout}: run --stage latents then --stage unet (with --components-from for the VAE)")
    if args.batch_size is not None and (args.batch_size < 1 or args.layout != "sd3"):
        p.error(f"--batch-size {args.batch_size}: applies to --layout sd3's unet stage, at least 1")
    if args.max_sequence_length < 1:
        p.error(f"--max-sequence-length {args.max_sequence_length}: give at least 1")
    return args


def main(argv=None) -> int:
    """`python -m d2g.shapes.train`: run the chosen stages and append their summaries to
    WORKDIR/summary.jsonl; returns the exit code."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    # Never the shipped weights by default: a documented command pasted as written must not replace them.
    args.out = args.out if args.out is not None else args.workdir / "weights"
    args.out.mkdir(parents=True, exist_ok=True)
    runners = {"evaluator": train_evaluator, "vae": train_vae, "latents": encode_latents, "unet": train_unet}
    summaries = []
    for stage in (STAGES if args.stage == "all" else (args.stage,)):
        summaries.append(runners[stage](args))
    with open(args.workdir / "summary.jsonl", "a") as f:
        for s in summaries:
            f.write(json.dumps({**s, "threads": args.threads, "seed": args.seed}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
