"""Record-level DP inside a site: Opacus DP-SGD, checked to really be private before training starts.

`make_private_training` wraps `opacus.PrivacyEngine.make_private` and then *probes* the model:
one forward/backward on a tiny batch must give every trainable parameter a per-sample
gradient of the right batch size. Models Opacus cannot handle raise `UnsupportedModelError`
instead of training without privacy.

Measured with Opacus 1.6 / transformers 5.x: tiny `LlamaForCausalLM` works as is.
`GPT2LMHeadModel` fails ("stack expects each tensor to be equal size") because GPT-2 builds
`position_ids` with batch dimension 1, so the position-embedding's per-sample gradient has
the wrong batch size. The documented fix, applied automatically when the probe shows it
works: a forward pre-hook passes `position_ids` expanded to the batch (`position_ids_fix`).

Noise: Opacus' default noise comes from torch's (non-cryptographic) generator and its
`secure_mode` needs torchcsprng, which is not a dependency. We replace the optimizer's
`add_noise` with the same Gaussian of std `noise_multiplier * max_grad_norm` drawn from
`SecureRandom` (AES-256-CTR), so the accounting is unchanged and the noise is unpredictable.
"""

from __future__ import annotations

import inspect
import logging
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers.optimizer import DPOptimizer, _check_processed_flag, _mark_as_processed
from opacus.validators import ModuleValidator

from worldlm_secure.errors import ConfigError
from worldlm_secure.privacy.accountant import ACCOUNTANTS, derive_noise_multiplier
from worldlm_secure.privacy.secure_random import SecureRandom


class UnsupportedModelError(ConfigError):
    """The model cannot be trained with per-sample gradients (DP-SGD) as configured."""


@dataclass
class PrivateTraining:
    """What the train loop uses instead of its own model/optimizer/loader."""

    model: torch.nn.Module  # opacus GradSampleModule; call it like the original model
    optimizer: torch.optim.Optimizer  # opacus DPOptimizer (clips per sample, adds secure noise)
    data_loader: Any  # Poisson-sampled DPDataLoader when poisson_sampling
    engine: PrivacyEngine
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    accountant: str
    position_ids_fix: bool
    _charged_steps: int = 0

    def take_uncharged_steps(self) -> int:
        """Optimizer steps since the last call: the `steps` of the next release's budget charge
        (`BudgetTracker.charge(noise_multiplier, sample_rate, steps)`)."""
        new = self.steps - self._charged_steps
        self._charged_steps = self.steps
        return new

    @property
    def steps(self) -> int:
        """Optimizer steps taken so far (what the ledger records as `steps`)."""
        return int(sum(s for _, _, s in self.engine.accountant.history))

    def epsilon(self, delta: float) -> float:
        """ε at δ spent by the steps taken so far (our accountant: the integer RDP orders the ledger replays)."""
        from worldlm_secure.privacy.accountant import MechanismStep, epsilon_of

        hist = [MechanismStep(float(z), float(q), int(s)) for z, q, s in self.engine.accountant.history]
        return epsilon_of(hist, delta, self.accountant) if self.steps else 0.0

    def unwrap(self) -> torch.nn.Module:
        """The original model (same parameters), e.g. to split into groups and release."""
        return cast(torch.nn.Module, self.model._module)  # GradSampleModule keeps the wrapped model in _module


def _secure_add_noise(self: Any) -> None:
    rng: SecureRandom = self._worldlm_rng
    std = self.noise_multiplier * self.max_grad_norm
    for p in self.params:
        _check_processed_flag(p.summed_grad)
        ref = p.summed_grad
        noise = torch.from_numpy(rng.standard_normal(tuple(ref.shape)) * std).to(dtype=ref.dtype, device=ref.device)
        p.grad = (ref + noise).view_as(p)
        _mark_as_processed(p.summed_grad)


def _default_probe_batch(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab:
        return None
    ids = (torch.arange(16).reshape(2, 8) % int(vocab)).long()
    return {"input_ids": ids, "labels": ids}


def _probe(gsm: torch.nn.Module, optimizer: Any, batch: Mapping[str, torch.Tensor]) -> str | None:
    """None when every trainable parameter gets a per-sample gradient of batch size; else the reason."""
    bsz = next(iter(batch.values())).shape[0]
    try:
        out = gsm(**batch)
        loss = out.loss if hasattr(out, "loss") else out[0]
        with warnings.catch_warnings():  # token ids need no gradient, so Opacus' hooks fire on outputs
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        for name, p in gsm.named_parameters():
            if p.requires_grad:
                gs = getattr(p, "grad_sample", None)
                if gs is None or gs.shape[0] != bsz:
                    return f"parameter {name} gets no per-sample gradient of batch size {bsz}"
        return None
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    finally:
        optimizer.zero_grad(set_to_none=True)
        for p in gsm.parameters():
            p.grad_sample = None  # type: ignore[attr-defined]  # Opacus' hooks add it; torch does not declare it


def _position_ids_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    ids = kwargs.get("input_ids")
    if ids is not None and kwargs.get("position_ids") is None and ids.dim() == 2:
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)
        kwargs = {**kwargs, "position_ids": pos}
    return args, kwargs


def make_private_training(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: Any,
    *,
    noise_multiplier: float | Literal["auto"],
    max_grad_norm: float,
    accountant: str = "rdp",
    poisson_sampling: bool = True,
    target_epsilon: float | None = None,
    target_delta: float | None = None,
    planned_steps: int | None = None,
    probe_batch: Mapping[str, torch.Tensor] | None = None,
) -> PrivateTraining:
    """Wrap model/optimizer/loader for DP-SGD (per-sample clipping to `max_grad_norm`, Gaussian noise).

    noise_multiplier="auto" derives it from target_epsilon/target_delta over planned_steps at the
    loader's sample rate (raises PolicyError when the budget cannot be met). Raises
    UnsupportedModelError when Opacus cannot compute per-sample gradients for the model.
    """
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"differential_privacy.accountant: unknown accountant {accountant!r} (use rdp or prv)")
    _check_layers(model)
    sample_rate = 1.0 / len(data_loader)
    if noise_multiplier == "auto":
        if target_epsilon is None or target_delta is None or planned_steps is None:
            raise ConfigError(
                "differential_privacy.record.noise_multiplier: auto needs target_epsilon, target_delta and planned_steps"
            )
        noise_multiplier = derive_noise_multiplier(target_epsilon, target_delta, sample_rate, planned_steps, accountant)
    logging.getLogger("opacus").setLevel(logging.ERROR)
    engine = PrivacyEngine(accountant=accountant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm, dp_opt, dp_loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=float(max_grad_norm),
            poisson_sampling=poisson_sampling,
        )
    _use_secure_noise(dp_opt)
    fixed = _probe_or_fix(model, gsm, dp_opt, probe_batch)
    return PrivateTraining(
        gsm, dp_opt, dp_loader, engine, float(noise_multiplier), float(max_grad_norm),
        sample_rate, accountant, fixed,
    )


# --- pieces shared with the engine's DP-SGD rounds (worldlm_secure/train/private.py) -------------
def _check_layers(model: torch.nn.Module) -> None:
    """Refuse layers Opacus cannot train privately (e.g. BatchNorm mixes samples in a batch)."""
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise UnsupportedModelError(
            f"record-level DP: {type(model).__name__} has layers Opacus cannot train privately "
            f"({'; '.join(str(e) for e in errors[:3])}); use a Llama-style config or ModuleValidator.fix"
        )


def _use_secure_noise(dp_opt: DPOptimizer) -> None:
    dp_opt._worldlm_rng = SecureRandom()
    dp_opt.add_noise = types.MethodType(_secure_add_noise, dp_opt)


def _probe_or_fix(
    model: torch.nn.Module, gsm: torch.nn.Module, zero: Any, probe_batch: Mapping[str, torch.Tensor] | None
) -> bool:
    """Probe per-sample gradients (applying the position_ids fix if it helps); True when the fix is on.
    ``zero`` is anything with ``zero_grad(set_to_none=True)`` (the DP optimizer, or the wrapped module)."""
    batch = probe_batch if probe_batch is not None else _default_probe_batch(model)
    if batch is None:
        raise ConfigError(
            f"record-level DP: cannot probe {type(model).__name__} for per-sample gradients; pass probe_batch= "
            "(a small batch of forward kwargs whose output has .loss)"
        )
    why = _probe(gsm, zero, batch)
    if why is None:
        return False
    if "position_ids" in inspect.signature(model.forward).parameters:
        handle = model.register_forward_pre_hook(_position_ids_hook, with_kwargs=True)
        if _probe(gsm, zero, batch) is None:
            return True
        handle.remove()
    raise UnsupportedModelError(
        f"record-level DP: Opacus cannot compute per-sample gradients for {type(model).__name__} ({why}); "
        "use a supported configuration (e.g. a Llama-style HF config) — training without DP is refused"
    )


@dataclass
class PerSampleModel:
    """A model wrapped once for per-sample gradients (the engine trains many sites in one module)."""

    gsm: GradSampleModule  # call it like the original model; hooks on only while a DP-SGD round runs
    position_ids_fix: bool

    def hooks_on(self) -> None:
        """Install the per-sample-gradient hooks (before a DP-SGD round)."""
        self.gsm.add_hooks(loss_reduction="mean", batch_first=True)
        self.gsm.enable_hooks()

    def hooks_off(self) -> None:
        """Remove them, so plain rounds and evaluation on the same module run exactly as without Opacus."""
        self.gsm.remove_hooks()


def wrap_per_sample(model: torch.nn.Module, *, probe_batch: Mapping[str, torch.Tensor] | None = None) -> PerSampleModel:
    """Wrap ``model`` (in place: same parameters) in Opacus' GradSampleModule and probe it.

    Raises UnsupportedModelError when Opacus cannot give every trainable parameter a per-sample
    gradient (the caller must then refuse to train, never train without DP). Hooks start removed.
    """
    _check_layers(model)
    logging.getLogger("opacus").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(model)
    fixed = _probe_or_fix(model, gsm, gsm, probe_batch)
    wrapped = PerSampleModel(gsm, fixed)
    wrapped.hooks_off()
    return wrapped


def secure_dp_optimizer(
    optimizer: torch.optim.Optimizer, *, noise_multiplier: float, max_grad_norm: float, expected_batch_size: int
) -> DPOptimizer:
    """Opacus' DPOptimizer around ``optimizer`` (whose state stays the caller's): per-sample clipping to
    ``max_grad_norm``, Gaussian noise of std ``noise_multiplier * max_grad_norm`` from SecureRandom, and
    the sum divided by ``expected_batch_size`` (q·N under Poisson sampling, not the drawn batch's size)."""
    dp_opt = DPOptimizer(
        optimizer,
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=float(max_grad_norm),
        expected_batch_size=int(expected_batch_size),
        loss_reduction="mean",
    )
    _use_secure_noise(dp_opt)
    return dp_opt
