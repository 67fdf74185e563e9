"""Calibrate LatentLPIPS heads on 2AFC triplets (BAPPS format, encoded to latents).

The trunk is frozen (eval-mode batch norm); the five 1x1 heads (with dropout) and a small
ranking network are trained so that the distances d0 = d(ref, p0), d1 = d(ref, p1) predict the
human judgement (fraction preferring p1) through a binary cross-entropy, as in LPIPS. Heads are
projected onto non-negative weights after every step. Output: `lpips.safetensors` (trunk +
heads, our format), loadable with `distill.lpips.load_lpips` or `make_regression_loss`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import load_trunk_into, save_lpips, trunk_file_shape
from .data import Triplets, load_triplets
from .latent_lpips import LatentLPIPS
from .runstate import check_config, check_start, save_checkpoint, step_generator

LPIPS_FILE = "lpips.safetensors"


class RankNet(nn.Module):
    """Maps a pair of distances to the logit that p1 is judged closer (the judge), as in LPIPS.

    Args:
        hidden: width of the two hidden 1x1 layers.
        eps: added to the denominators of the distance ratios.
    """

    def __init__(self, hidden: int = 32, eps: float = 0.1) -> None:
        super().__init__()
        self.eps = eps
        self.net = nn.Sequential(
            nn.Conv2d(5, hidden, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, hidden, 1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(hidden, 1, 1),
        )

    def forward(self, d0: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
        """Logits [B] of "p1 is closer" from the distances d0 = d(ref, p0), d1 = d(ref, p1) [B]."""
        # Differences and ratios let the network learn a scale-free comparison of the two distances.
        feats = torch.stack([d0, d1, d0 - d1, d0 / (d1 + self.eps), d1 / (d0 + self.eps)], dim=1)
        return self.net(feats[:, :, None, None]).flatten()  # logit of "p1 is closer"


def two_afc_score(d0: torch.Tensor, d1: torch.Tensor, judge: torch.Tensor) -> float:
    """BAPPS 2AFC agreement: credit judge when d1 < d0, 1 - judge when d0 < d1, half on ties.

    Args:
        d0, d1: distances of p0 and p1 to the reference [B].
        judge: fraction of people preferring p1 [B].
    """
    score = (d1 < d0).float() * judge + (d0 < d1).float() * (1 - judge) + (d0 == d1).float() * 0.5
    return float(score.mean())


@dataclass
class CalibrateConfig:
    """Options of `calibrate` (the `distill lpips calibrate` flags).

    Args:
        data: folder of 2AFC triplet shards (see `data.load_triplets`).
        trunk: trunk weights (our trunk or LPIPS safetensors, or an official trunk file).
        out: run directory (checkpoint.pt and lpips.safetensors).
        steps: total optimisation steps.
        batch_size: triplets per step.
        lr: Adam learning rate.
        seed: fixes the ranking network's init, batch order and dropout per step.
        checkpoint_every: steps between checkpoints.
        log_every: steps between JSON log lines.
        resume: continue from OUT/checkpoint.pt.
    """

    data: str
    trunk: str
    out: str
    steps: int = 1000
    batch_size: int = 50
    lr: float = 1e-4
    seed: int = 0
    checkpoint_every: int = 100
    log_every: int = 10
    resume: bool = False


def distances(model: LatentLPIPS, batch: Triplets) -> tuple[torch.Tensor, torch.Tensor]:
    """(d(ref, p0), d(ref, p1)) per triplet, feature distance only (no L1 term).

    Args:
        model: the LatentLPIPS being calibrated.
        batch: the triplets.
    """
    return model.feature_distance(batch.ref, batch.p0), model.feature_distance(batch.ref, batch.p1)


def calibrate(cfg: CalibrateConfig) -> Path:
    """Run (or resume) head calibration; returns the path of the exported LPIPS file.

    Args:
        cfg: the options.
    """
    for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    out = Path(cfg.out)
    data = load_triplets(cfg.data)
    channels, width, pools_removed = trunk_file_shape(cfg.trunk)
    if data.ref.shape[1] != channels:
        raise ValueError(
            f"triplets in {cfg.data} have {data.ref.shape[1]} channels, the trunk {cfg.trunk} takes {channels}"
        )
    state = check_start(out, cfg.resume)
    run_config = {**asdict(cfg), "latent_channels": channels, "width": width, "pools_removed": pools_removed}
    run_config.pop("resume")
    run_config.pop("out")

    torch.manual_seed(cfg.seed)  # the ranking network's initial weights are part of what --seed fixes
    model = LatentLPIPS(channels, width, l1_weight=0.0, dropout=True, pools_removed=pools_removed)
    load_trunk_into(cfg.trunk, model.trunk)
    model.trunk.eval().requires_grad_(False)
    rank = RankNet()
    optimizer = torch.optim.Adam(
        [*model.lins.parameters(), *rank.parameters()], lr=cfg.lr, betas=(0.5, 0.999)
    )
    step = 0
    if state is not None:
        check_config(
            state["config"],
            run_config,
            out,
            ignore=("steps", "log_every", "checkpoint_every", "data", "trunk"),
        )
        model.load_state_dict(state["model"])
        rank.load_state_dict(state["rank"])
        optimizer.load_state_dict(state["optimizer"])
        step = int(state["step"])
        print(json.dumps({"event": "resume", "step": step}), flush=True)

    model.lins.train()
    rank.train()
    started = time.time()
    while step < cfg.steps:
        generator = step_generator(cfg.seed, step)
        batch = data.batch(torch.randint(len(data), (cfg.batch_size,), generator=generator))
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # head dropout masks, reproducible on resume
        d0, d1 = distances(model, batch)
        loss = F.binary_cross_entropy_with_logits(rank(d0, d1), batch.judge)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.clamp_weights_()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            print(
                json.dumps(
                    {
                        "step": step,
                        "loss": round(loss.item(), 5),
                        "2afc": two_afc_score(d0.detach(), d1.detach(), batch.judge),
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
                    "rank": rank.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "config": run_config,
                },
            )

    path = out / LPIPS_FILE
    save_lpips(model.eval(), path)
    return path
