"""Diffusion2GAN discriminator: a trainable copy of the teacher UNet with readout heads.

Parts (each switchable, for the paper's ablation):
- text through the UNet's own cross-attention (and pooled text / time ids for SDXL-type UNets);
- z conditioning: the generator's input noise through a zero-initialised conv added to conv_in's output;
- multi-scale input: the judged latent, resized, added to each down block's input through
  zero-initialised convs;
- readout heads at every decoder scale: before the skip connection (the decoder feature entering
  the up block), at it (the concatenation of decoder and skip features, i.e. the first resnet's
  input) and after it (the block's output before upsampling).
Zero initialisation keeps the backbone's activations equal to the teacher's at step 0.
The UNet's conv_norm_out / conv_out are dropped: nothing reads them, and unused parameters would
get no gradient (and break DDP without find_unused_parameters).

With LoRA (`shared=`), the UNet is not copied: the discriminator is the adapter "disc" on the base
the teacher (and a LoRA student) share (distill.lora.SharedUNet), active only inside its own calls;
its trainable parameters are that adapter and the z/multi-scale convs and heads. The shared base
keeps its conv_out (frozen, its output unused) and the hooks stay installed, inert outside the
discriminator's calls (they act only while `_ctx` is set).
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from distill.conditioning import Conditioning
from distill.discriminators.base import JudgedInOneBatch, without_fused_attention
from distill.discriminators.heads import ReadoutHead
from distill.discriminators.unet_probe import dummy_conditioning, probe_size
from distill.objective_config import HEAD_POINTS, D2GConfig, LoRASettings


def _zero_conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class D2GDiscriminator(JudgedInOneBatch, nn.Module):
    """The Diffusion2GAN discriminator (see the module docstring); implements
    distill.discriminators.base.Discriminator.

    Args:
        teacher_unet: the teacher's UNet2DConditionModel; copied (float32, trainable), not modified.
        z_conditioning: add the generator's input noise z through a zero-initialised conv.
        multiscale: add the judged latent, resized, to every down block's input.
        readout_heads: heads at every decoder scale at `head_points`; False: one head on the
            decoder's final output.
        head_points: where each decoder scale is read: any of HEAD_POINTS.
        timestep: the timestep the UNet is evaluated at.
        head_hidden: hidden width of the readout heads.
        gradient_checkpointing: recompute the UNet's activations in backward.
        r1_samples: how many real samples the single-sample R1 penalty uses.
        shared: a distill.lora.SharedUNet over `teacher_unet`: train adapter "disc" on it instead
            of a full copy (`lora` its settings).
        lora: rank, alpha and targets of that adapter (required with `shared`).
    """

    def __init__(
        self,
        teacher_unet: nn.Module,
        *,
        z_conditioning: bool = True,
        multiscale: bool = True,
        readout_heads: bool = True,
        head_points: tuple[str, ...] = HEAD_POINTS,
        timestep: int = 0,
        head_hidden: int = 64,
        gradient_checkpointing: bool = False,
        r1_samples: int = 1,
        shared=None,
        lora: LoRASettings | None = None,
    ):
        super().__init__()
        bad = [p for p in head_points if p not in HEAD_POINTS]
        if bad:
            raise ValueError(f"unknown d2g head points {bad}; choose from {HEAD_POINTS}")
        self.r1_samples = int(r1_samples)
        self._shared = None if shared is None else [shared]  # a list: the shared base is no submodule
        self._checkpointing = bool(gradient_checkpointing)
        if shared is None:
            self.unet = copy.deepcopy(teacher_unet).float().train().requires_grad_(True)
            self.unet.conv_norm_out = None
            self.unet.conv_out = nn.Identity()
            if gradient_checkpointing:
                self.unet.enable_gradient_checkpointing()
        else:
            from distill.lora import DISC, AdapterParameters

            if lora is None:
                raise ValueError("a discriminator on a shared UNet needs its LoRA settings (lora=)")
            shared.add_adapter(DISC, lora, "discriminator_lora_targets")
            self.lora = AdapterParameters(shared, DISC)
        self.timestep = int(timestep)
        self.z_conditioning = z_conditioning
        self.multiscale = multiscale
        in_ch = self.backbone.config.in_channels
        # Readout taps: every decoder scale at the chosen points, or only the decoder's final output
        # (the "plain diffusion-UNet discriminator" ablation row).
        n_up = len(self.backbone.up_blocks)
        if readout_heads:
            self.tap_names = [f"up{i}.{p}" for i in range(n_up) for p in head_points]
        else:
            self.tap_names = [f"up{n_up - 1}.after"]
        self._ctx: dict | None = None
        self.z_conv: nn.Module | None = None  # built after probing the plain UNet's shapes
        self.ms_convs: nn.ModuleList | None = None
        self._install_hooks()
        shapes = self._probe_shapes()
        self.z_conv = _zero_conv(in_ch, self.backbone.conv_in.out_channels) if z_conditioning else None
        self.ms_convs = (
            nn.ModuleList([_zero_conv(in_ch, shapes[f"down{i}.in"][0]) for i in range(len(self.backbone.down_blocks))])
            if multiscale
            else None
        )
        self.heads = nn.ModuleDict(
            {name.replace(".", "_"): ReadoutHead(shapes[name][0], head_hidden) for name in self.tap_names}
        )

    @classmethod
    def from_config(cls, teacher_unet: nn.Module, schedule: nn.Module, config: D2GConfig, *,
                    gradient_checkpointing: bool | None = None, shared=None,
                    lora: LoRASettings | None = None) -> D2GDiscriminator:
        """The discriminator a `d2g` objective's config describes (the schedule is not needed:
        this discriminator judges latents at one fixed timestep); gradient checkpointing from the
        config unless given, and a LoRA adapter on `shared` when given."""
        checkpointing = config.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
        return cls(
            teacher_unet, z_conditioning=config.d2g_z_conditioning, multiscale=config.d2g_multiscale,
            readout_heads=config.d2g_readout_heads, head_points=config.d2g_head_points,
            timestep=config.d2g_timestep, head_hidden=config.head_hidden,
            gradient_checkpointing=checkpointing, r1_samples=config.r1_samples, shared=shared, lora=lora,
        )

    @property
    def backbone(self) -> nn.Module:
        """The UNet this discriminator runs: its own copy, or the shared base (with its adapter)."""
        return self._shared[0].unet if self._shared is not None else self.unet

    def _running(self):
        """The context of one backbone call: the adapter "disc" switched on (and checkpointing as
        set) on a shared base; nothing for an own copy."""
        if self._shared is None:
            return contextlib.nullcontext(self.unet)
        from distill.lora import DISC

        return self._shared[0].use(DISC, checkpointing=self._checkpointing)

    # -- hooks -----------------------------------------------------------------------------------
    def _install_hooks(self) -> None:
        # Hooks are bound methods or partials of them (not closures), so copy.deepcopy of the
        # discriminator rebinds them to the copy.
        unet = self.backbone
        unet.conv_in.register_forward_hook(self._conv_in_hook)
        for i, block in enumerate(unet.down_blocks):
            block.register_forward_pre_hook(functools.partial(self._down_pre_hook, i), with_kwargs=True)
        for i, block in enumerate(unet.up_blocks):
            block.register_forward_pre_hook(functools.partial(self._record_kwarg, f"up{i}.before"), with_kwargs=True)
            block.resnets[0].register_forward_pre_hook(functools.partial(self._record_arg, f"up{i}.skip"))
            if getattr(block, "upsamplers", None):
                block.upsamplers[0].register_forward_pre_hook(functools.partial(self._record_arg, f"up{i}.after"))
            else:
                block.register_forward_hook(functools.partial(self._record_output, f"up{i}.after"))

    def _conv_in_hook(self, module, args, output):
        ctx = self._ctx
        if ctx is None or ctx.get("z") is None or self.z_conv is None:
            return None
        z = ctx["z"].to(self.z_conv.weight.dtype)  # fp32 convs over a half-precision shared base
        return output + self.z_conv(z).to(output.dtype)

    def _down_pre_hook(self, index: int, module, args, kwargs):
        ctx = self._ctx
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if ctx is None:
            return None
        ctx["shapes"][f"down{index}.in"] = tuple(hidden.shape[1:])
        if self.ms_convs is None:
            return None
        x = ctx["latent"]
        if x.shape[-2:] != hidden.shape[-2:]:
            x = F.interpolate(x, size=hidden.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
        conv = self.ms_convs[index]
        hidden = hidden + conv(x.to(conv.weight.dtype)).to(hidden.dtype)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden,) + tuple(args[1:]), kwargs

    def _store(self, name: str, tensor: torch.Tensor) -> None:
        ctx = self._ctx
        if ctx is not None:
            ctx["features"][name] = tensor
            ctx["shapes"][name] = tuple(tensor.shape[1:])

    def _record_kwarg(self, name: str, module, args, kwargs):
        self._store(name, kwargs.get("hidden_states", args[0] if args else None))

    def _record_arg(self, name: str, module, args):
        self._store(name, args[0])

    def _record_output(self, name: str, module, args, output):
        self._store(name, output[0] if isinstance(output, tuple) else output)

    @contextlib.contextmanager
    def double_backward_safe(self):
        """For R1 (see without_fused_attention); a LoRA discriminator on the shared base turns its
        per-call checkpointing off instead of the model's."""
        if self._shared is not None:  # the shared base's checkpointing is set per call by _running
            checkpointing, self._checkpointing = self._checkpointing, False
            try:
                with sdpa_kernel(SDPBackend.MATH):
                    yield
            finally:
                self._checkpointing = checkpointing
            return
        with without_fused_attention(self.unet):
            yield

    # -- forward ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _probe_shapes(self) -> dict:
        size = probe_size(self.backbone)
        param = next(self.backbone.parameters())
        x = torch.zeros(1, self.backbone.config.in_channels, size, size, device=param.device, dtype=param.dtype)
        self._ctx = {"latent": x, "z": None, "features": {}, "shapes": {}}
        try:
            with self._running() as unet:
                unet(x, torch.zeros(1, dtype=torch.long, device=param.device),
                     **dummy_conditioning(unet).unet_kwargs())
            return dict(self._ctx["shapes"])
        finally:
            self._ctx = None

    def forward(
        self, latent: torch.Tensor, cond: Conditioning, z: torch.Tensor | None = None, return_features: bool = False
    ):
        """Real/fake logits of `latent` [B, C, h, w] under `cond`, one column per readout head:
        [B, n_heads] (float32); `z` is the generator's input noise (required with z conditioning).
        With `return_features`, also the tapped feature maps by tap name."""
        if self.z_conditioning and z is None:
            raise ValueError("d2g discriminator has z conditioning on but no noise 'z' was given")
        timesteps = torch.full((latent.shape[0],), self.timestep, device=latent.device, dtype=torch.long)
        self._ctx = {"latent": latent, "z": z, "features": {}, "shapes": {}}
        try:
            with self._running() as unet:
                dtype = next(unet.parameters()).dtype
                unet(latent.to(dtype), timesteps, **cond.to(dtype).unet_kwargs())
            features = self._ctx["features"]
        finally:
            self._ctx = None
        if self._shared is not None and not torch.is_autocast_enabled(latent.device.type):
            head_dtype = next(self.heads.parameters()).dtype  # a half-precision shared base, fp32 heads
            features = {k: v.to(head_dtype) for k, v in features.items()}
        logits = torch.stack([self.heads[n.replace(".", "_")](features[n]) for n in self.tap_names], dim=1)
        return (logits, features) if return_features else logits

    # -- the objective's entry points (distill.discriminators.base.Discriminator) ------------------
