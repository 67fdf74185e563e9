"""LoRA runs end to end: exact resume from adapter-only checkpoints, and export both ways (a diffusers
LoRA for the stock teacher pipeline, and the merged pipeline) reproducing the student."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.export import LORA_FOLDER, export_student, load_student, student_latents
from distill.train_config import load_train_config
from distill.trainer import Trainer
from pairgen.config import load_config
from pairgen.runner import PairgenRun

# The student adapts convolutions too (LCM-LoRA's choice): diffusers' LoRA files have two key namings,
# and a file mixing them loads with part of the adapter silently dropped.
GENERATOR_TARGETS = "to_q,to_k,to_v,to_out.0,conv1,conv2"
LORA = dict(generator_lora_rank=4, generator_lora_alpha=8.0, generator_lora_targets=GENERATOR_TARGETS,
            discriminator_lora_rank=2,
            grad_checkpointing="both", objective="d2g",
            objective_config={"regression_loss": "mse", "lambda_gan": 0.1, "r1_every": 2})


@pytest.fixture(scope="module")
def pairs(ray_local, sd15_teacher, tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("lora-pairs")
    prompts = folder / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = str(folder / "pairs")
    PairgenRun(load_config(None, dict(teacher=str(sd15_teacher), prompts=str(prompts), out=out, num_pairs=8,
                                      shard_size=8, steps=2, guidance=1.0, batch_size=4, seed=1)),
               progress=False).run()
    return out


def _config(pairs, teacher, out, **overrides):
    base = dict(data=pairs, teacher=str(teacher), out=str(out), max_steps=4, batch_size=4, checkpoint_every=2,
                log_every=1, use_ray=False, lr_g=1e-2, lr_d=1e-3, shuffle_block=8, seed=3, ema_decay=0.5, **LORA)
    base.update(overrides)
    return load_train_config(None, base)


@pytest.fixture(scope="module")
def straight_run(pairs, sd15_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-run") / "a"
    summary = Trainer(_config(pairs, sd15_teacher, out)).run(progress=False)
    return out, summary


def _checkpoint(run, step: int, group: str) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"step-{step:08d}" / f"{group}.safetensors")


def test_resume_of_a_lora_run_reproduces_the_uninterrupted_run(pairs, sd15_teacher, straight_run, tmp_path):
    run_a, straight = straight_run
    Trainer(_config(pairs, sd15_teacher, tmp_path / "b", max_steps=2)).run(progress=False)
    resumed = Trainer(_config(pairs, sd15_teacher, tmp_path / "b")).run(progress=False)
    assert resumed.resumed_from == 2 and resumed.steps == 4
    for group in ("generator", "ema", "discriminator"):
        a, b = _checkpoint(run_a, 4, group), _checkpoint(tmp_path / "b", 4, group)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=f"{group} {key}")
    assert straight.rank_weight_hashes == resumed.rank_weight_hashes
    # Adapters and the discriminator's own parts only: no base UNet weight in any checkpoint.
    unet_weights = sum(p.numel() for p in load_student(str(sd15_teacher)).unet.parameters())
    generator = _checkpoint(run_a, 4, "generator")
    assert generator and all(".lora_A/" in k or ".lora_B/" in k or "/lora_A/" in k or "/lora_B/" in k
                             for k in generator)
    assert sum(t.numel() for t in generator.values()) < unet_weights / 5
    disc = _checkpoint(run_a, 4, "discriminator")
    assert {k.split(".")[0] for k in disc} == {"lora", "heads", "z_conv", "ms_convs"}
    start = _checkpoint(run_a, 2, "generator")
    assert any(not torch.equal(start[k], generator[k]) for k in generator)


def test_lora_export_loads_in_the_stock_teacher_pipeline_and_merged(sd15_teacher, straight_run, tmp_path):
    from diffusers import DiffusionPipeline, LCMScheduler

    run, _ = straight_run
    info = export_student(str(run), str(tmp_path / "export"))
    folder = tmp_path / "export"
    assert info["lora"]["rank"] == 4 and (folder / LORA_FOLDER / "pytorch_lora_weights.safetensors").exists()
    assert "load_lora_weights" in (folder / "README.md").read_text()
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square"]
    generate = student_latents(load_student(str(folder)), prompts, noise)  # what `distill generate` runs

    merged = DiffusionPipeline.from_pretrained(folder)
    assert not any("lora" in n for n, _ in merged.unet.named_parameters())
    stock = DiffusionPipeline.from_pretrained(sd15_teacher)
    teacher_1step = student_latents(stock, prompts, noise)  # the teacher's own one-step x0
    stock.load_lora_weights(str(folder / LORA_FOLDER))
    stock.scheduler = LCMScheduler.from_pretrained(folder, subfolder="scheduler")
    for pipe in (merged, stock):
        pipe.set_progress_bar_config(disable=True)
        out = pipe(prompt=prompts, latents=noise, num_inference_steps=1, guidance_scale=0.0,
                   output_type="latent").images
        torch.testing.assert_close(out, generate, rtol=1e-4, atol=1e-4)
    # The trained adapter changed the student: the comparison above is not the teacher against itself.
    assert (generate - teacher_1step).abs().max() > 1e-2
    # And the exports are the trained adapter, all of it: the checkpoint's EMA adapter put into the
    # teacher UNet by peft directly (not through diffusers' loader) gives the merged UNet's outputs.
    torch.testing.assert_close(_unet_output(merged.unet), _unet_output(_peft_student(run, sd15_teacher)),
                               rtol=1e-4, atol=1e-5)


def _peft_student(run: Path, teacher: Path):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    unet = load_student(str(teacher)).unet
    config = LoraConfig(r=LORA["generator_lora_rank"], lora_alpha=LORA["generator_lora_alpha"],
                        target_modules=GENERATOR_TARGETS.split(","))
    inject_adapter_in_model(config, unet)
    prefix = "lora.weights."
    ema = {k[len(prefix):].replace("/", "."): v for k, v in _checkpoint(run, 4, "ema").items() if k.startswith(prefix)}
    assert any(".conv1." in k for k in ema) and any(".to_q." in k for k in ema)
    result = set_peft_model_state_dict(unet, ema)
    assert not result.unexpected_keys
    return unet


@torch.no_grad()
def _unet_output(unet) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    return unet(x, torch.tensor([999, 999]), encoder_hidden_states=text).sample


def test_memory_options_are_distill_train_flags():
    from d2g.cli.options import flag_overrides
    from distill.cli import build_parser
    from distill.train_config import TrainConfig

    args = build_parser().parse_args(["train", "--generator-lora-rank", "8", "--discriminator-lora-targets",
                                      "to_q,to_v", "--grad-checkpointing", "generator"])
    assert flag_overrides(args, TrainConfig) == {"generator_lora_rank": 8, "discriminator_lora_targets": "to_q,to_v",
                                                 "grad_checkpointing": "generator"}


@pytest.mark.skipif(not os.environ.get("D2G_LORA_RAY_TESTS"), reason="about 70 s on 2 cores (two Ray Train workers); "
                    "set D2G_LORA_RAY_TESTS=1")
def test_two_ray_train_workers_train_the_same_adapters_as_one_process(ray_local, pairs, sd15_teacher, tmp_path):
    """Only the adapters and the discriminator's own parts are averaged across ranks: two Ray Train
    workers of batch 2 end where one process accumulating the same two micro-batches of 2 does."""
    reference = tmp_path / "one"
    Trainer(_config(pairs, sd15_teacher, reference, batch_size=2, grad_accum=2)).run(progress=False)
    flags = []
    for key, value in {**_config(pairs, sd15_teacher, tmp_path / "ddp").model_dump(mode="json"),
                       "batch_size": 2, "workers": 2, "cpus_per_worker": 0.5, "threads": 1, "use_ray": True}.items():
        if value is None or key == "betas":
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            flags += [flag, json.dumps(value) if isinstance(value, dict) else str(value)]
    result = subprocess.run([str(Path(sys.executable).parent / "distill"), "train", *flags, "--json"],
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address})
    assert result.returncode == 0, result.stderr[-3000:]
    hashes = json.loads(result.stdout)["rank_weight_hashes"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]
    for group in ("generator", "discriminator"):
        a, b = _checkpoint(reference, 4, group), _checkpoint(tmp_path / "ddp", 4, group)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-3, atol=1e-5)
