"""`distill train --fsdp`: the generator (and discriminator, EMA) sharded over 2 gloo ranks with
FSDP2 trains to the DDP-style run's weights, writes the same unsharded checkpoints, and a checkpoint
it wrote resumes on 1 worker without FSDP to the uninterrupted result.

Ranks are real processes in a gloo group, forked as in tests/distill/test_elastic.py (whose run
config this reuses: regression with MSE, which draws no random numbers).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from distill.checkpoint import CheckpointStore
from distill.train_config import TrainConfigError, load_train_config
from tests.distill.test_elastic import _config, _metrics
from tests.helpers.gloo_ranks import run_on_ranks
from tests.helpers.store_data import make_dataset

STEPS, HALF = 4, 2  # fewer than test_elastic's 6: every step of the fixture's four runs costs time


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> str:
    """24 pairs of the tiny SD1.5 teacher's latent shape (4x8x8): synthetic, no pairgen needed."""
    out = str(tmp_path_factory.mktemp("fsdp-pairs") / "pairs")
    make_dataset(out, shards=3, per_shard=8)
    return out


def _rank(rank: int, world: int, config: dict, pg: str) -> None:
    import torch.distributed as dist

    from distill.fsdp import local_numel
    from distill.train_config import TrainConfig
    from distill.trainer import Trainer

    dist.init_process_group("gloo", init_method=f"file://{pg}", rank=rank, world_size=world)
    try:
        trainer = Trainer(TrainConfig(**config), rank, world)
        # What this rank stores of the trainable parameters while sharded, against their full size.
        stored = {"local": local_numel(trainer.g_params + trainer.d_params),
                  "full": sum(p.numel() for p in trainer.g_params + trainer.d_params)}
        trainer.run(progress=False)
        (Path(config["out"]) / f"rank{rank}-params.json").write_text(json.dumps(stored))
    finally:
        dist.destroy_process_group()


def _run(config, world: int, tmp: Path) -> None:
    """Train `config` on `world` ranks: in this process for 1, else forked processes in a gloo group."""
    if world == 1:
        from distill.trainer import Trainer

        Trainer(config).run(progress=False)
        return
    run_on_ranks(_rank, config.model_dump(mode="json"), world, tmp)


def _checkpoint(run: Path, step: int) -> tuple[dict, dict]:
    weights, objects, _ = CheckpointStore(str(run)).load(step, ["generator", "ema", "discriminator"])
    return weights, objects


def _assert_close(ours: dict, theirs: dict, what: str) -> None:
    """Equal keys and shapes (the unsharded format), and values equal up to float32 rounding.

    Both runs average the same two per-rank gradients (FSDP reduce-scatters, DDP all-reduces: a
    sum of 2, halved exactly). What differs is summation order: clip_grad_norm_ sums the squared
    gradients per shard and then over the ranks (the logged norms differ in the 7th digit), and the
    all-gathered weights sit at other addresses, so CPU conv kernels may accumulate differently.
    AdamW with beta1 = 0 divides each gradient by its own running magnitude, so an element whose
    gradient is nearly zero can turn such a ~1e-7 relative difference into a visible one: measured,
    2 of ~200k generator weights differed by up to 4e-6 after 3 and 6 steps, all others by under 1e-6.
    atol 1e-5 / rtol 1e-4 (as in test_elastic) allows that, while a wrong gradient (one rank's
    alone, a shard lost or misplaced) moves whole tensors by ~lr = 1e-3, and a wrongly scaled one
    (not averaged) shows in the AdamW moments compared alongside (exp_avg is the last gradient, as
    beta1 = 0) and in the logged gradient norms."""
    assert ours.keys() == theirs.keys(), what
    for key, tensor in ours.items():
        if isinstance(tensor, dict):
            _assert_close(tensor, theirs[key], f"{what}.{key}")
        elif isinstance(tensor, torch.Tensor):
            assert tensor.shape == theirs[key].shape, (what, key)
            assert torch.allclose(tensor.float(), theirs[key].float(), rtol=1e-4, atol=1e-5), (what, key)
        else:
            assert tensor == theirs[key], (what, key)


@pytest.fixture(scope="module")
def runs(pairs, sd15_teacher, tmp_path_factory) -> dict[str, Path]:
    """The DDP-style run (2 ranks, 4 steps, EMA on); the FSDP run: 2 ranks to step 2, then resumed
    on 2 ranks with FSDP to 4; and a copy of its step-2 checkpoint resumed on 1 worker without FSDP."""
    tmp = tmp_path_factory.mktemp("fsdp")
    ema = {"ema_decay": 0.9, "max_steps": STEPS, "checkpoint_every": HALF}
    _run(_config(pairs, sd15_teacher, tmp / "ddp", **ema), 2, tmp)
    _run(_config(pairs, sd15_teacher, tmp / "fsdp", fsdp=True, **{**ema, "max_steps": HALF}), 2, tmp)
    shutil.copytree(tmp / "fsdp", tmp / "single")
    _run(_config(pairs, sd15_teacher, tmp / "fsdp", fsdp=True, **ema), 2, tmp)
    _run(_config(pairs, sd15_teacher, tmp / "single", workers=1, **ema), 1, tmp)
    return {"ddp": tmp / "ddp", "fsdp": tmp / "fsdp", "single": tmp / "single"}


def test_fsdp_trains_to_the_ddp_weights_in_the_same_checkpoint_format(runs):
    for step in (HALF, STEPS):  # HALF: written by sharded ranks from scratch; STEPS: after a sharded resume
        (weights, objects), (reference, ref_objects) = _checkpoint(runs["fsdp"], step), _checkpoint(runs["ddp"], step)
        _assert_close(weights, reference, f"weights@{step}")
        _assert_close(objects["opt_g"], ref_objects["opt_g"], f"opt_g@{step}")
    ours, theirs = _metrics(runs["fsdp"]), _metrics(runs["ddp"])
    for step in range(1, STEPS + 1):  # the clipped norm is of the whole averaged gradient, as with DDP
        assert ours[step]["data/order_xxh3"] == theirs[step]["data/order_xxh3"]
        assert ours[step]["g/grad_norm"] == pytest.approx(theirs[step]["g/grad_norm"], rel=1e-5), step


def test_an_fsdp_checkpoint_resumes_on_one_worker_without_fsdp(runs):
    weights, objects = _checkpoint(runs["single"], STEPS)
    reference, ref_objects = _checkpoint(runs["ddp"], STEPS)
    _assert_close(weights, reference, "weights")
    _assert_close(objects["opt_g"], ref_objects["opt_g"], "opt_g")
    state = json.loads((runs["single"] / "checkpoints" / f"step-{STEPS:08d}" / "state.json").read_text())
    assert state["world_size"] == 1 and state["global_batch"] == 4


def test_each_rank_stores_about_half_of_the_trainable_parameters(runs):
    stored = [json.loads((runs["fsdp"] / f"rank{r}-params.json").read_text()) for r in range(2)]
    full = stored[0]["full"]
    assert full > 10_000 and all(s["full"] == full for s in stored)
    # dim-0 shards: a tensor of odd length leaves one element more on rank 0; together they hold it all.
    assert sum(s["local"] for s in stored) == full
    for s in stored:
        assert s["local"] == pytest.approx(full / 2, rel=0.02)
    ddp = [json.loads((runs["ddp"] / f"rank{r}-params.json").read_text()) for r in range(2)]
    assert all(s["local"] == s["full"] == full for s in ddp)  # without FSDP every rank holds all of it


def test_a_d2g_run_with_r1_trains_to_the_ddp_weights(pairs, sd15_teacher, tmp_path):
    """The GAN objective: a sharded generator and discriminator (teacher-UNet copy and heads), the
    phases freezing one while the other trains, and R1 (a backward through an input gradient) at
    every step, which needs the discriminator to keep its gathered weights through both backwards
    (distill.fsdp.shard's double_backward); both models gradient-checkpointed. Both runs draw the
    same random numbers (mix-and-match): every rank's seed is the same with and without FSDP.
    Tolerances: see _assert_close."""
    options = dict(objective="d2g", objective_config={"regression_loss": "mse", "r1_every": 1}, max_steps=2,
                   grad_checkpointing="both",  # recomputed blocks gather their weights again in backward
                   checkpoint_every=2, lr_d=1e-3)  # lr_d as lr_g: a wrong D gradient moves D by ~1e-3
    _run(_config(pairs, sd15_teacher, tmp_path / "ddp", **options), 2, tmp_path)
    _run(_config(pairs, sd15_teacher, tmp_path / "fsdp", fsdp=True, **options), 2, tmp_path)
    (weights, objects), (reference, ref_objects) = _checkpoint(tmp_path / "fsdp", 2), _checkpoint(tmp_path / "ddp", 2)
    assert weights.keys() == {"generator", "discriminator"}
    # A readout head's conv bias ahead of a GroupNorm with one channel per group (hidden <= 32) has
    # a true gradient of exactly 0 (normalisation removes a per-channel constant): what backward
    # computes is rounding noise, which AdamW, dividing by its own running size, turns into moves of
    # up to lr_d per step in either run: 2 steps leave them at most 2 x 2 x lr_d apart. All else as above.
    noise_only = [k for k, v in reference["discriminator"].items()
                  if k.startswith("heads.") and k.endswith(".conv.bias") and math.gcd(v.numel(), 32) == v.numel()]
    assert noise_only
    for key in noise_only:
        ours, theirs = weights["discriminator"].pop(key), reference["discriminator"].pop(key)
        assert torch.allclose(ours, theirs, rtol=0, atol=2 * 2 * 1e-3), key
    _assert_close(weights, reference, "weights")
    _assert_close(objects["opt_d"], ref_objects["opt_d"], "opt_d")
    ours, theirs = _metrics(tmp_path / "fsdp"), _metrics(tmp_path / "ddp")
    assert ours[2]["d/r1"] == pytest.approx(theirs[2]["d/r1"], rel=1e-4) and ours[2]["d/r1"] > 0


def test_fsdp_is_refused_with_lora_one_worker_or_fp16(tmp_path):
    base = dict(out=str(tmp_path), fsdp=True, workers=2)
    with pytest.raises(TrainConfigError, match="fsdp: not with LoRA"):
        load_train_config(None, {**base, "generator_lora_rank": 4})
    with pytest.raises(TrainConfigError, match=r"fsdp: needs --workers > 1"):
        load_train_config(None, {**base, "workers": 1})
    with pytest.raises(TrainConfigError, match="fsdp: not with amp fp16"):
        load_train_config(None, {**base, "amp": "fp16"})
    assert load_train_config(None, base).fsdp
