"""LoRA students and discriminators on one shared frozen base, and gradient checkpointing as options."""

from __future__ import annotations

import pytest
import torch

from distill.objective_config import LoRASettings, MemoryOptions, parse_objective_config
from distill.objectives import ObjectiveError, make_objective
from distill.train_config import TrainConfigError, load_train_config
from tests.helpers.objectives import PROMPTS

LORA = LoRASettings(rank=4, alpha=8.0)
SHARED = MemoryOptions(generator_lora=LORA, discriminator_lora=LORA)
OPTIONS = {"regression_loss": "mse", "r1_every": 1, "mix_and_match": 0.25}


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"noise": torch.randn(4, 4, 8, 8, generator=g), "latent": torch.randn(4, 4, 8, 8, generator=g),
            "prompt": PROMPTS}


def _objective(teacher, memory: MemoryOptions | None, name: str = "d2g", seed: int = 0, options: dict = OPTIONS):
    from d2g.teacher.loading import load_teacher

    torch.manual_seed(seed)
    pipe = load_teacher(str(teacher))
    obj = make_objective(name, pipe, parse_objective_config(name, options), memory=memory)
    return obj, pipe


def _perturb_adapters(obj, seed: int = 5) -> None:
    """Non-zero LoRA B matrices (fresh adapters are exact no-ops), so a wrong adapter shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in (obj.generator, obj.discriminator):
            for key, p in (module.lora.weights.items() if hasattr(module, "lora") else ()):
                if "lora_B" in key:
                    p.copy_(0.05 * torch.randn(p.shape, generator=g))


def _step(obj, batch) -> tuple[dict, dict, dict, dict]:
    """D loss (with R1) and G loss, each backpropagated; their values and the gradients after each."""
    torch.manual_seed(11)
    d_loss, d_logs = obj.discriminator_loss(batch, 0)
    d_loss.backward()
    d_grads = {n: p.grad.clone() for n, p in obj.discriminator.named_parameters() if p.grad is not None}
    g_grads_after_d = {n for n, p in obj.generator.named_parameters() if p.grad is not None}
    obj.discriminator.zero_grad(set_to_none=True)
    torch.manual_seed(12)
    g_loss, g_logs = obj.generator_loss(batch, 1)
    g_loss.backward()
    g_grads = {n: p.grad.clone() for n, p in obj.generator.named_parameters() if p.grad is not None}
    d_grads_after_g = {n for n, p in obj.discriminator.named_parameters() if p.grad is not None}
    assert not g_grads_after_d and not d_grads_after_g, "a phase reached the other player's parameters"
    return d_logs, g_logs, d_grads, g_grads


def test_shared_base_holds_one_unet_and_each_phase_trains_only_its_adapter(sd15_teacher):
    from diffusers import UNet2DConditionModel

    obj, pipe = _objective(sd15_teacher, SHARED)
    _perturb_adapters(obj)
    unets = [m for m in (pipe.unet, obj.generator, obj.discriminator)
             for m in m.modules() if isinstance(m, UNet2DConditionModel)]
    assert len(unets) == 1 and obj.generator.unet is pipe.unet and obj.discriminator.backbone is pipe.unet
    base = {n for n, _ in pipe.unet.named_parameters() if ".lora_" not in n}
    assert all(not p.requires_grad for n, p in pipe.unet.named_parameters() if n in base)
    g_names = {n for n, _ in obj.generator.named_parameters()}
    assert g_names and all(n.startswith("lora.weights.") for n in g_names)
    d_names = {n for n, _ in obj.discriminator.named_parameters()}
    assert {n.split(".")[0] for n in d_names} == {"lora", "heads", "z_conv", "ms_convs"}
    # The two adapters are different tensors on the same modules.
    g_ids = {id(p) for p in obj.generator.parameters()}
    assert not g_ids & {id(p) for p in obj.discriminator.lora.parameters()}
    d_logs, g_logs, d_grads, g_grads = _step(obj, _batch())
    assert "d/r1" in d_logs and set(d_grads) == d_names and set(g_grads) == g_names
    assert all(p.grad is None for n, p in pipe.unet.named_parameters() if n in base)


def test_the_teacher_is_the_base_with_adapters_off(sd15_teacher):
    from d2g.teacher.loading import load_teacher

    full, _ = _objective(sd15_teacher, None)
    obj, _ = _objective(sd15_teacher, SHARED)
    batch = _batch()
    noise, _, cond = obj._prepare(batch)
    t = torch.full((4,), 500, dtype=torch.long)
    with torch.no_grad():
        # A fresh adapter (B = 0) is the teacher: the LoRA student starts where the full copy does.
        torch.testing.assert_close(obj.generator(noise, None, cond), full.generator(noise, None, cond))
        _perturb_adapters(obj)
        student = obj.generator(noise, None, cond)
        teacher = obj._teacher_x0s(noise, t, [cond])[0]
        fresh = load_teacher(str(sd15_teacher)).unet
        expected = obj.schedule.to_x0(fresh(noise, t, **cond.unet_kwargs()).sample, noise, t)
    torch.testing.assert_close(teacher, expected)
    assert not torch.allclose(student, full.generator(noise, None, cond), atol=1e-4)


@pytest.mark.parametrize("memory", [None, SHARED, MemoryOptions(generator_lora=LORA),
                                    MemoryOptions(discriminator_lora=LORA)],
                         ids=["full", "shared-lora", "lora-generator", "lora-discriminator"])
def test_gradient_checkpointing_gives_the_same_losses_and_gradients(sd15_teacher, memory):
    results = []
    for checkpointing in (False, True):
        options = MemoryOptions(memory.generator_lora, memory.discriminator_lora) if memory else MemoryOptions()
        options = MemoryOptions(options.generator_lora, options.discriminator_lora, checkpointing, checkpointing)
        obj, _ = _objective(sd15_teacher, options)
        if memory is not None:
            _perturb_adapters(obj)  # a block recomputed under the wrong adapter would change the gradients
            assert obj.shared.unet.is_gradient_checkpointing is False  # on only inside the players' calls
        for unet in (getattr(m, "unet", None) for m in (obj.generator, obj.discriminator)):
            if unet is not None and unet is not obj.teacher_unet:  # a full copy: always on or off
                assert unet.is_gradient_checkpointing is checkpointing
        results.append(_step(obj, _batch()))
    (d_logs, g_logs, d_grads, g_grads), (d_logs2, g_logs2, d_grads2, g_grads2) = results
    for logs, again in ((d_logs, d_logs2), (g_logs, g_logs2)):
        assert again == pytest.approx(logs, rel=1e-5, abs=1e-6)
    for grads, again in ((d_grads, d_grads2), (g_grads, g_grads2)):
        assert grads.keys() == again.keys()
        for name in grads:
            torch.testing.assert_close(again[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["regression", "add"])
def test_a_lora_student_trains_with_the_other_objectives(sd15_teacher, name):
    options = {"sd_guidance_scale": 2.0} if name == "add" else {"regression_loss": "mse"}
    obj, pipe = _objective(sd15_teacher, MemoryOptions(generator_lora=LORA, checkpoint_generator=True), name,
                           options=options)
    before = {k: v.clone() for k, v in obj.generator.state_dict().items()}
    opt = torch.optim.SGD(obj.generator.parameters(), lr=1.0)
    if obj.discriminator is not None:
        obj.discriminator_loss(_batch(), 0)[0].backward()
    loss, logs = obj.generator_loss(_batch(), 1)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in obj.generator.state_dict().items())
    assert all(p.grad is None for n, p in pipe.unet.named_parameters() if ".lora_" not in n)


def test_lora_options_are_refused_where_they_do_not_apply(sd15_teacher, tmp_path):
    with pytest.raises(ObjectiveError, match="discriminator_lora_rank"):
        _objective(sd15_teacher, MemoryOptions(discriminator_lora=LORA), "add", options={"sd_guidance_scale": 2.0})
    with pytest.raises(ObjectiveError, match="generator_lora_targets to_nothing"):
        _objective(sd15_teacher, MemoryOptions(generator_lora=LoRASettings(4, 4.0, ("to_nothing",))))
    base = dict(data=str(tmp_path), out=str(tmp_path / "run"), use_ray=False)
    for objective in ("regression", "add", "ladd"):
        with pytest.raises(TrainConfigError, match="discriminator_lora_rank: objective"):
            load_train_config(None, {**base, "objective": objective, "discriminator_lora_rank": 4})
    with pytest.raises(TrainConfigError, match="generator_lora_targets"):
        load_train_config(None, {**base, "generator_lora_targets": "to_q,,to_k"})
    config = load_train_config(None, {**base, "generator_lora_rank": 8, "discriminator_lora_rank": 4,
                                      "discriminator_lora_alpha": 2, "grad_checkpointing": "discriminator"})
    memory = config.memory()
    assert memory.generator_lora == LoRASettings(8, 8.0) and memory.discriminator_lora == LoRASettings(4, 2.0)
    assert (memory.checkpoint_generator, memory.checkpoint_discriminator) == (False, True)
