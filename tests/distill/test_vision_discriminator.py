"""ADD's published discriminator (`add_discriminator: vision`): a frozen vision backbone on decoded
pixels with trainable heads; the one training path that decodes latents."""

from __future__ import annotations

import pydantic
import pytest
import torch

from distill.discriminators.vision import VisionDiscriminator, default_layers
from distill.objective_config import ADDConfig, LADDConfig, parse_objective_config
from distill.objectives import ObjectiveError, make_objective
from tests.helpers.objectives import PROMPTS


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A tiny random ViT saved as a model folder, as a downloaded DINOv2 would be."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                       image_size=32, patch_size=8)
    path = tmp_path_factory.mktemp("vit") / "vit"
    ViTModel(config).save_pretrained(path)
    return str(path)


def _load(path):
    from d2g.teacher.loading import load_teacher

    return load_teacher(str(path))


def _batch(n=4):
    return {"noise": torch.randn(n, 4, 8, 8), "latent": torch.randn(n, 4, 8, 8), "prompt": PROMPTS[:n]}


def _vision(vit, **options):
    return ADDConfig(add_discriminator="vision", add_vision_backbone=vit, student_steps=1, **options)


def test_add_trains_heads_through_the_decoder_and_never_the_backbone(vit, sd15_teacher):
    pipe = _load(sd15_teacher)
    decodes = []
    hook = pipe.vae.decoder.register_forward_hook(lambda *a: decodes.append(1))
    # lambda_sd 0: the GAN term alone, so the generator's gradient can only come through the decode.
    obj = make_objective("add", pipe, _vision(vit, lambda_sd=0.0, r1_every=1))
    disc = obj.discriminator
    assert isinstance(disc, VisionDiscriminator)
    assert disc.layers == [1, 2, 3, 4] and disc.size == (32, 32)  # the ViT's 4 blocks; its image_size
    heads0 = {k: v.clone() for k, v in disc.state_dict().items()}
    backbone0 = {k: v.clone() for k, v in disc.backbone.state_dict().items()}
    g_opt = torch.optim.Adam(obj.generator.parameters(), lr=1e-3)
    d_opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    torch.manual_seed(0)
    for step in range(2):
        d_loss, d_logs = obj.discriminator_loss(_batch(), step)
        d_opt.zero_grad()
        d_loss.backward()
        d_opt.step()
        assert d_logs["d/r1"] > 0  # R1 on the heads' inputs
        g_loss, g_logs = obj.generator_loss(_batch(), step)
        g_opt.zero_grad()
        g_loss.backward()
        assert set(g_logs) == {"g/gan", "g/total"}
        grads = [p.grad for p in obj.generator.parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
        g_opt.step()
    hook.remove()
    assert decodes, "the vision discriminator decodes latents"
    assert all(p.grad is None for p in disc.backbone.parameters())
    assert all(p.grad is None for p in pipe.vae.parameters())
    changed = [k for k, v in disc.state_dict().items() if not torch.equal(v, heads0[k])]
    assert len(changed) > len(heads0) // 2, changed
    assert all(torch.equal(v, backbone0[k]) for k, v in disc.backbone.state_dict().items())


def test_only_heads_are_parameters_and_state(vit, sd15_teacher):
    pipe = _load(sd15_teacher)
    obj = make_objective("ladd", pipe, LADDConfig(add_discriminator="vision", add_vision_backbone=vit,
                                                   add_vision_layers=[0, 4], student_steps=1))
    disc = obj.discriminator
    assert list(disc.heads) == ["layer0", "layer4"]
    assert all(k.startswith("heads.") for k in disc.state_dict())
    backbone_ids = {id(p) for p in disc.backbone.parameters()} | {id(p) for p in pipe.vae.parameters()}
    assert not backbone_ids & {id(p) for p in disc.parameters()}
    assert not any(p.requires_grad for p in disc.backbone.parameters()) and not disc.backbone.training
    # A reloaded discriminator takes the saved heads strictly (nothing of the backbone is expected).
    other = make_objective("ladd", pipe, obj.config).discriminator
    other.load_state_dict(disc.state_dict(), strict=True)
    # The real's image embedding conditions the heads: another real, other logits for the same fake.
    batch = _batch(2)
    cond = obj.conditioner(batch, (8, 8))
    with torch.no_grad():
        a = disc.generator_logits(batch["noise"], cond, real=batch["latent"])
        b = disc.generator_logits(batch["noise"], cond, real=batch["latent"].flip(0))
    assert a.shape == (2, 2) and not torch.allclose(a, b)


def test_default_layers_are_evenly_spaced_and_end_with_the_last():
    assert default_layers(12) == [3, 6, 9, 12]
    assert default_layers(4) == [1, 2, 3, 4]
    assert default_layers(2) == [1, 2]


def test_bad_options_are_one_line_errors_naming_the_option(vit, sd15_teacher, tmp_path):
    with pytest.raises(pydantic.ValidationError, match="add_vision_backbone: add_discriminator 'vision' needs"):
        parse_objective_config("add", {"add_discriminator": "vision"})
    with pytest.raises(pydantic.ValidationError, match="add_vision_size: only used with add_discriminator"):
        parse_objective_config("ladd", {"add_vision_size": 224})
    with pytest.raises(pydantic.ValidationError, match="add_vision_layers"):
        parse_objective_config("add", {"add_discriminator": "vision", "add_vision_backbone": vit,
                                       "add_vision_layers": []})
    pipe = _load(sd15_teacher)
    cases = [
        (str(tmp_path / "missing"), {}, "add_vision_backbone: .*missing is not a folder"),
        (str(tmp_path), {}, "add_vision_backbone: .* has no config.json"),
        # The teacher's own CLIP text encoder folder: a transformers model, but not a vision one.
        (str(sd15_teacher / "text_encoder"), {}, "add_vision_backbone: .* is not a vision model \\(CLIPTextModel"),
        (vit, {"add_vision_layers": [2, 9]}, r"add_vision_layers: \[9\] out of range; .* 0\.\.4"),
    ]
    for path, extra, message in cases:
        config = ADDConfig(add_discriminator="vision", add_vision_backbone=path, student_steps=1, **extra)
        with pytest.raises(ObjectiveError, match=f"^objective 'add': {message}") as err:
            make_objective("add", pipe, config)
        assert "\n" not in str(err.value)


def test_the_vision_option_decodes_where_the_default_never_does(vit, sd15_teacher):
    """The never-decode test (test_objectives_api.py) covers the default; this option does decode."""
    pipe = _load(sd15_teacher)
    calls = []
    decode = pipe.vae.decode

    def counting(*args, **kwargs):
        calls.append(args[0].shape[0])
        return decode(*args, **kwargs)

    pipe.vae.decode = counting
    obj = make_objective("add", pipe, _vision(vit, lambda_sd=0.0))
    calls.clear()  # building may probe; count training only
    loss, _ = obj.discriminator_loss(_batch(), 1)
    loss.backward()
    assert calls == [8], "reals and fakes decoded in one batch"
    loss, _ = obj.generator_loss(_batch(), 1)
    loss.backward()
    assert calls == [8, 4, 4], "the G step decodes the reals (image embedding) and the fakes"
    default = make_objective("add", pipe, ADDConfig(student_steps=1, lambda_sd=0.0))
    calls.clear()
    default.discriminator_loss(_batch(), 1)[0].backward()
    default.generator_loss(_batch(), 1)[0].backward()
    assert calls == []


def test_flow_teachers_refuse_the_vision_option_in_one_line(vit, sd3_teacher):
    pipe = _load(sd3_teacher)
    config = LADDConfig(add_discriminator="vision", add_vision_backbone=vit, student_steps=1)
    with pytest.raises(ObjectiveError, match="^objective 'ladd': add_discriminator 'vision' is not supported for "
                       "StableDiffusion3Pipeline teachers; use 'teacher'$"):
        make_objective("ladd", pipe, config)
