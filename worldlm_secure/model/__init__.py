"""Causal LMs from a config or a pretrained folder, LoRA adapters, and their parameter groups."""

from worldlm_secure.model.adapters import LoraSpec, apply_adapters, freeze_base_as_buffers
from worldlm_secure.model.factory import ModelSpec, build_config, build_model, count_parameters
from worldlm_secure.model.grouping import GROUPS, Group, ParameterGroups, assign_groups
from worldlm_secure.model.pretrained import base_weights_hash, load_pretrained

__all__ = [
    "GROUPS",
    "Group",
    "LoraSpec",
    "ModelSpec",
    "ParameterGroups",
    "apply_adapters",
    "assign_groups",
    "base_weights_hash",
    "build_config",
    "build_model",
    "count_parameters",
    "freeze_base_as_buffers",
    "load_pretrained",
]
