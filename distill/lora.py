"""LoRA students and discriminators on one frozen base UNet shared with the teacher.

With LoRA (peft), the teacher's own UNet becomes the base of named adapters: "student" for the
generator, "disc" for the Diffusion2GAN discriminator's UNet (and "student_ema" for the EMA of the
student). `SharedUNet.use(name)` switches the active adapter for one call and switches back to
none on exit, so the teacher is the base with adapters disabled, the default state: code that
calls the teacher UNet directly (score distillation, ADD's frozen features) needs no change. Three
UNet copies become one plus adapters.

Two things peft's own switch (`set_adapter`) does not suit here, and why we set its layers'
state ourselves:
- `set_adapter` also sets requires_grad (on for the active adapter, off for the others). The
  generator's loss runs the student and then the discriminator before backward; turning the
  student's requires_grad off in between would drop its gradients, so requires_grad is only ever
  set by the objective's phase switch (distill.objectives._set_trainable).
- gradient checkpointing recomputes a block during backward, when another adapter (or none) may
  be active: our checkpoint function records the adapter active at forward time and restores it
  for the recomputation (torch.utils.checkpoint's context_fn).

Trainable adapter weights are exposed to optimisers, DDP-style gradient averaging, EMA and
checkpoints through `AdapterParameters`, a module whose parameters are the adapter's own tensors
(shared, not copied), named like peft's state dict with the adapter name removed and '.' -> '/'.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from distill.conditioning import Conditioning
from distill.generator import Generators, NoiseSchedule, few_step_sample
from distill.objective_config import LoRASettings

STUDENT, DISC, STUDENT_EMA = "student", "disc", "student_ema"


class LoRAError(ValueError):
    """LoRA settings this UNet cannot take (e.g. a target module it does not have); names the option."""


def lora_config(settings: LoRASettings):
    """The peft LoraConfig of `settings` (rank, alpha, target module names; B initialised to zero,
    so a fresh adapter leaves the base's outputs unchanged)."""
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=list(settings.targets),
                      init_lora_weights=True, lora_dropout=0.0, bias="none")


def _key(param_name: str, adapter: str) -> str | None:
    """'a.b.lora_A.<adapter>.weight' -> 'a/b/lora_A/weight' (None for another adapter's or a base weight)."""
    parts = param_name.split(".")
    if len(parts) < 3 or parts[-2] != adapter or not parts[-3].startswith("lora_"):
        return None
    return "/".join(parts[:-2] + parts[-1:])


def peft_key(key: str) -> str:
    """An AdapterParameters key back to peft's state-dict name (no adapter name): 'a.b.lora_A.weight'."""
    return key.replace("/", ".")


class SharedUNet:
    """The teacher UNet as the frozen base of named LoRA adapters (see the module docstring).

    Args:
        unet: the teacher's UNet2DConditionModel; adapters are injected into it in place.
    """

    def __init__(self, unet: nn.Module):
        self.unet = unet.requires_grad_(False)
        self.adapters: dict[str, LoRASettings] = {}
        self._layers: list[nn.Module] = []
        self._active: str | None = None
        self._checkpointing = False

    def __deepcopy__(self, memo):  # modules holding the base in a list must never copy it
        return self

    def add_adapter(self, name: str, settings: LoRASettings, option: str = "lora_targets") -> None:
        """Inject adapter `name` (trainable, float32, B = 0) into the base; LoRAError naming
        `option` when a target module is not in this UNet."""
        from peft import inject_adapter_in_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        if name in self.adapters:
            raise LoRAError(f"adapter {name!r} is already on the shared UNet")
        # peft's injection re-runs set_adapter, which changes the other adapters' requires_grad.
        flags = {pname: p.requires_grad for pname, p in self.unet.named_parameters()}
        try:
            with warnings.catch_warnings():  # "multiple adapters in the model": deliberate here
                warnings.filterwarnings("ignore", message=".*multiple adapters.*")
                inject_adapter_in_model(lora_config(settings), self.unet, adapter_name=name)
        except ValueError as err:
            raise LoRAError(f"{option} {','.join(settings.targets)}: {str(err).splitlines()[0]}") from err
        self.adapters[name] = settings
        self._layers = [m for m in self.unet.modules() if isinstance(m, BaseTunerLayer)]
        for pname, p in self.unet.named_parameters():
            if _key(pname, name) is not None:
                p.data = p.data.float()  # trainable in float32 even over a half-precision base
                p.requires_grad_(True)
            else:
                p.requires_grad_(flags.get(pname, False))
        self._apply(self._active)

    def parameters_of(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter `name`'s parameters by AdapterParameters key (the tensors themselves)."""
        found = {}
        for pname, p in self.unet.named_parameters():
            key = _key(pname, name)
            if key is not None:
                found[key] = p
        return found

    def _apply(self, name: str | None) -> None:
        # peft's LoRA layers read `_active_adapter` and `_disable_adapters` in forward; set_adapter
        # would also change requires_grad (see the module docstring).
        for layer in self._layers:
            if name is not None:
                layer._active_adapter = [name]
            layer._disable_adapters = name is None
        self._active = name

    def _set_checkpointing(self, on: bool) -> None:
        if on != self._checkpointing:
            if on:
                self.unet.enable_gradient_checkpointing(self._checkpoint)
            else:
                self.unet.disable_gradient_checkpointing()
            self._checkpointing = on

    def _checkpoint(self, module: nn.Module, *args):
        """diffusers' gradient-checkpointing function, made adapter-aware: the block recomputed in
        backward runs with the adapter that was active when it ran forward."""
        active = self._active
        return torch.utils.checkpoint.checkpoint(
            module.__call__, *args, use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), self.use(active)))

    @contextlib.contextmanager
    def use(self, name: str | None, checkpointing: bool | None = None) -> Iterator[nn.Module]:
        """Within the block, the base runs with adapter `name` (None: no adapter, the teacher) and,
        when `checkpointing` is not None, with gradient checkpointing on or off; both are restored
        on exit. Yields the UNet."""
        previous, previous_ckpt = self._active, self._checkpointing
        if name is not None and name not in self.adapters:
            raise KeyError(f"no adapter {name!r} on the shared UNet (have {sorted(self.adapters)})")
        self._apply(name)
        if checkpointing is not None:
            self._set_checkpointing(checkpointing)
        try:
            yield self.unet
        finally:
            self._apply(previous)
            if checkpointing is not None:
                self._set_checkpointing(previous_ckpt)


class AdapterParameters(nn.Module):
    """One adapter's trainable tensors as a module's parameters (the same tensors the UNet's LoRA
    layers use, not copies), so optimisers, gradient averaging, EMA and state_dict see the adapter
    alone. Keys: peft state-dict names without the adapter, '.' -> '/'.

    Args:
        shared: the shared base UNet.
        name: the adapter.
    """

    def __init__(self, shared: SharedUNet, name: str):
        super().__init__()
        self.weights = nn.ParameterDict(shared.parameters_of(name))

    def peft_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter in peft's state-dict naming ('...to_q.lora_A.weight'), detached."""
        return {peft_key(k): v.detach() for k, v in self.weights.items()}


class LoRAGenerator(nn.Module):
    """The student as adapter `adapter` on the shared base: same interface as
    distill.generator.OneStepGenerator (forward, sample, schedule, last_timestep).

    Args:
        shared: the shared base (the teacher UNet); the adapter is injected here.
        scheduler: the teacher's scheduler, for the NoiseSchedule.
        settings: rank, alpha and target modules.
        gradient_checkpointing: recompute the base's activations in backward during this generator's calls.
        adapter: the adapter's name.
    """

    def __init__(self, shared: SharedUNet, scheduler, settings: LoRASettings, gradient_checkpointing: bool = False,
                 adapter: str = STUDENT):
        super().__init__()
        self._shared = [shared]  # a list: the base is no submodule (parameters() and state_dict() are the adapter's)
        self.adapter, self.settings = adapter, settings
        self.gradient_checkpointing = gradient_checkpointing
        shared.add_adapter(adapter, settings, "generator_lora_targets")
        self.lora = AdapterParameters(shared, adapter)
        self.schedule = NoiseSchedule(scheduler)

    @property
    def shared(self) -> SharedUNet:
        """The shared base UNet with its adapters."""
        return self._shared[0]

    @property
    def unet(self) -> nn.Module:
        """The base UNet (with every adapter injected; this generator's is active only in its calls)."""
        return self.shared.unet

    @property
    def last_timestep(self) -> int:
        """T-1: the timestep a one-step student denoises pure noise at."""
        return self.schedule.num_train_timesteps - 1

    def __deepcopy__(self, memo) -> LoRAGenerator:
        """A copy is another adapter on the same base (e.g. the EMA's, "student_ema"), with this
        one's values: copying the module must not copy the base UNet."""
        copy = LoRAGenerator.__new__(LoRAGenerator)
        nn.Module.__init__(copy)
        copy._shared = self._shared
        copy.adapter, copy.settings = STUDENT_EMA if self.adapter == STUDENT else f"{self.adapter}_copy", self.settings
        copy.gradient_checkpointing = False
        self.shared.add_adapter(copy.adapter, self.settings, "generator_lora_targets")
        copy.lora = AdapterParameters(self.shared, copy.adapter)
        with torch.no_grad():
            for key, p in copy.lora.weights.items():
                p.copy_(self.lora.weights[key])
        copy.schedule = self.schedule
        copy.train(self.training)
        return copy

    def forward(self, x_t: torch.Tensor, timesteps: torch.Tensor | None, cond: Conditioning) -> torch.Tensor:
        """Predict the clean latent from x_t at `timesteps` (None: the last timestep, x_t = noise)."""
        if timesteps is None:
            timesteps = torch.full((x_t.shape[0],), self.last_timestep, device=x_t.device, dtype=torch.long)
        with self.shared.use(self.adapter, checkpointing=self.gradient_checkpointing) as unet:
            dtype = next(unet.parameters()).dtype
            pred = unet(x_t.to(dtype), timesteps, **cond.to(dtype).unet_kwargs()).sample
        return self.schedule.to_x0(pred, x_t, timesteps)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, cond: Conditioning, steps: int = 1, generator: Generators = None,
               trained_steps: int | None = None) -> torch.Tensor:
        """`steps`-step sampling (distill.generator.few_step_sample), as OneStepGenerator.sample."""
        grid = self.schedule.student_grid(steps, trained_steps)
        return few_step_sample(functools.partial(self, cond=cond), self.schedule, noise, grid, generator)


def save_diffusers_lora(pipe_class, state: dict[str, torch.Tensor], settings: LoRASettings, folder: str) -> None:
    """Write a student adapter (peft state-dict naming, `AdapterParameters.peft_state_dict`) as
    diffusers' LoRA file (`pytorch_lora_weights.safetensors`, with its LoraConfig as metadata) in
    `folder`, loadable with `pipe.load_lora_weights(folder)` on the teacher's pipeline class."""
    metadata = lora_config(settings).to_dict()
    metadata = {k: (sorted(v) if isinstance(v, set) else v) for k, v in metadata.items()}
    # Written in peft's naming as it is. diffusers' convert_state_dict_to_diffusers renames only the
    # attention projections (to_q.lora_A -> to_q.lora.down); with other targets (convolutions,
    # feed-forward) the file mixes both namings and load_lora_weights silently drops the renamed ones.
    pipe_class.save_lora_weights(folder, unet_lora_layers=dict(state), safe_serialization=True,
                                 unet_lora_adapter_metadata=metadata)


__all__ = ["AdapterParameters", "DISC", "LoRAError", "LoRAGenerator", "STUDENT", "STUDENT_EMA", "SharedUNet",
           "lora_config", "peft_key", "save_diffusers_lora"]
