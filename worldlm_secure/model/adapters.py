"""LoRA adapters (through `peft`) as the only trainable, and so the only releasable, parameters.

`apply_adapters` wraps a causal LM with ``peft.get_peft_model(model, LoraConfig(...))`` and then turns
every frozen base weight into a **buffer** of its module (`freeze_base_as_buffers`). Afterwards
``model.named_parameters()`` yields the adapter tensors only, so everything that walks the parameters
(the engine's groups and releases, secure aggregation, the optimizer, Opacus' per-sample gradients, the
Ray site actors and the nodes) sees adapters and nothing else, unchanged: a base weight is not a
parameter, so no policy glob can select it and nothing can release it. The base weights still take part
in every forward pass and are bit-identical before and after training (nothing updates a buffer).

Adapter parameter names (what a policy's ``layers:`` globs match), for a Llama-style model with
``target_modules: [q_proj, v_proj, gate_proj, lm_head]``::

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight   # (r, d_in)
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight   # (d_out, r)
    base_model.model.model.layers.0.mlp.gate_proj.lora_A.default.weight
    base_model.model.lm_head.lora_A.default.weight

so ``*.self_attn.*.lora_*`` (or ``*.q_proj.lora_*``) selects attention adapters, ``*.mlp.*.lora_*`` the MLP
adapters and ``*lm_head.lora_*`` the head adapters. GPT-2 names its modules ``c_attn`` / ``c_fc`` /
``c_proj`` (``base_model.model.transformer.h.0.attn.c_attn.lora_A.default.weight``). The repository's
example policies (``*.self_attn.*``, ``*.mlp.*``, ``*.attn.*``) already match these names.

Dropout: ``dropout > 0`` draws from torch's global generator, so in-process and Ray runs then differ
in the dropout masks; the default 0.0 keeps every backend bit-comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worldlm_secure.errors import ConfigError

ADAPTER_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")
BASE_MARKERS = (".base_layer.", ".original_module.")


@dataclass(frozen=True)
class LoraSpec:
    """``model.adapters.lora``: rank ``r``, scaling ``alpha / r``, dropout on the adapter input, and the
    module names to adapt (None: peft's default for the architecture, e.g. q_proj and v_proj for Llama,
    c_attn for GPT-2; ``["all-linear"]``: every linear layer but the output head)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None


def is_adapter_name(name: str) -> bool:
    return any(m in name for m in ADAPTER_MARKERS)


def is_base_name(name: str) -> bool:
    """True for a name peft gives a wrapped base weight (``...q_proj.base_layer.weight``)."""
    return any(m in name for m in BASE_MARKERS)


def freeze_base_as_buffers(model: torch.nn.Module) -> list[str]:
    """Move every parameter that does not require a gradient into its module's buffers (same tensor,
    persistent, so ``state_dict()`` still holds it); returns their names in model order."""
    moved: list[str] = []
    for mod_name, module in model.named_modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.requires_grad:
                continue
            del module._parameters[name]
            module.register_buffer(name, param.detach(), persistent=True)
            moved.append(f"{mod_name}.{name}" if mod_name else name)
    return moved


def base_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base model's weights under its own names: for a peft model, ``state_dict()`` without the adapter
    tensors, ``base_model.model.`` stripped and ``.base_layer.`` collapsed (the names before wrapping)."""
    state = model.state_dict()
    if not hasattr(model, "peft_config"):
        return state
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if is_adapter_name(name):
            continue
        base = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        out[base] = tensor
    return out


def apply_adapters(model: torch.nn.Module, spec: LoraSpec, *, seed: int = 0) -> torch.nn.Module:
    """``model`` with LoRA adapters (peft), its base weights frozen as buffers. The adapters' initial
    values depend on ``seed`` only (every node builds the same ones)."""
    from peft import LoraConfig, get_peft_model

    if spec.r < 1:
        raise ConfigError(f"model.adapters.lora.r: must be at least 1 (got {spec.r})")
    targets: list[str] | str | None = list(spec.target_modules) if spec.target_modules else None
    if targets == ["all-linear"]:
        targets = "all-linear"
    # peft annotates lora_alpha as int, but only uses it in scaling = lora_alpha / r: a float alpha is kept as is
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha,  # type: ignore[arg-type]
                        lora_dropout=spec.dropout, target_modules=targets, bias="none", task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            peft_model = get_peft_model(model, config)
        except ValueError as exc:  # peft: target modules not found / unsupported layer / no default for the arch
            raise ConfigError(f"model.adapters.lora.target_modules: {str(exc).splitlines()[0][:300]}") from None
    frozen = freeze_base_as_buffers(peft_model)
    trainable = [n for n, _ in peft_model.named_parameters()]
    if not trainable:
        raise ConfigError("model.adapters.lora.target_modules: matched no module, so nothing would train")
    # torch types Module.__setattr__ values as Tensor | Module; a plain attribute is fine at runtime
    peft_model.base_weight_names = tuple(frozen)  # type: ignore[assignment]
    return peft_model

