"""Causal LMs from a config, and their parameter groups."""

from worldlm_secure.model.factory import ModelSpec, build_config, build_model, count_parameters
from worldlm_secure.model.grouping import GROUPS, Group, ParameterGroups, assign_groups

__all__ = [
    "GROUPS",
    "Group",
    "ModelSpec",
    "ParameterGroups",
    "assign_groups",
    "build_config",
    "build_model",
    "count_parameters",
]
