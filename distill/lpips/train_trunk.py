"""Train the latent VGG16-BN trunk as a classifier of labelled latents (the paper used ImageNet).

Writes into `out`: `checkpoint.pt` every `checkpoint_every` steps (resumable) and, at the end,
`trunk.safetensors` (our trunk format, input to `calibrate`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoints import save_trunk
from .data import LabelledLatentFolder
from .runstate import check_config, check_start, save_checkpoint, step_generator
from .trunk import NUM_POOLS_REMOVED, LatentClassifier

TRUNK_FILE = "trunk.safetensors"


@dataclass
class TrunkTrainConfig:
    """Options of `train_trunk` (the `distill lpips train-trunk` flags).

    Args:
        data: folder of class sub-folders of latents (see `data.LabelledLatentFolder`).
        out: run directory (checkpoint.pt and trunk.safetensors).
        steps: total optimisation steps.
        batch_size: latents per step.
        lr, momentum, weight_decay: SGD settings.
        width: trunk channel multiplier (1.0 is the official architecture).
        pools_removed: identity max-pools of the trunk: 3 for latents (published), 0 for a pixel
            trunk trained on images (the shapes pixel LPIPS).
        seed: fixes the initial weights and the batch order.
        checkpoint_every: steps between checkpoints.
        log_every: steps between JSON log lines.
        resume: continue from OUT/checkpoint.pt.
    """

    data: str
    out: str
    steps: int = 1000
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    width: float = 1.0
    pools_removed: int = NUM_POOLS_REMOVED
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    resume: bool = False


def _validate(cfg: TrunkTrainConfig) -> None:
    for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")


def train_trunk(cfg: TrunkTrainConfig) -> Path:
    """Run (or resume) trunk training; returns the path of the exported trunk.

    Args:
        cfg: the options.
    """
    _validate(cfg)
    out = Path(cfg.out)
    data = LabelledLatentFolder(cfg.data)
    state = check_start(out, cfg.resume)
    run_config = {**asdict(cfg), "latent_shape": list(data.latent_shape), "num_classes": len(data.classes)}
    run_config.pop("resume")
    run_config.pop("out")

    torch.manual_seed(cfg.seed)  # the initial weights are part of what --seed fixes
    model = LatentClassifier(data.latent_shape[0], len(data.classes), cfg.width, cfg.pools_removed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    step = 0
    if state is not None:
        check_config(
            state["config"], run_config, out, ignore=("steps", "log_every", "checkpoint_every", "data")
        )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        print(json.dumps({"event": "resume", "step": step}), flush=True)

    model.train()
    started = time.time()
    while step < cfg.steps:
        generator = step_generator(cfg.seed, step)
        indices = torch.randint(len(data), (cfg.batch_size,), generator=generator)
        latents, labels = data.batch(indices)
        logits = model(latents)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            accuracy = float((logits.argmax(1) == labels).float().mean())
            print(
                json.dumps(
                    {
                        "step": step,
                        "loss": round(loss.item(), 5),
                        "acc": accuracy,
                        "s": round(time.time() - started, 1),
                    }
                ),
                flush=True,
            )
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(
                out,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "config": run_config,
                },
            )

    path = out / TRUNK_FILE
    save_trunk(model.trunk, path)
    return path
