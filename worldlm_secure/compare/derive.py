"""A grid cell as real files: derived policies that `extends:` each base policy, and a derived world.

Every cell runs through the real policy loader and engine: its variation is written as a policy
overriding the base node's `secure_aggregation.protocol`, `differential_privacy.*` and
`residuals.allowed`, so a combination the policies cannot meet (e.g. distributed noise without
masking) is refused exactly as `simulate` would refuse it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from worldlm_secure.compare.grid import NOISE_MECHANISM, Cell, DPSetting


def policy_overrides(cell: Cell, protocol_params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The policy sections a cell changes (empty: the base policy as is)."""
    out: dict[str, Any] = {}
    if cell.protocol is not None:
        sa: dict[str, Any] = {"protocol": [cell.protocol]}
        if cell.protocol in protocol_params:
            sa[cell.protocol] = dict(protocol_params[cell.protocol])
        out["secure_aggregation"] = sa
    dp = cell.dp
    if dp == "off":
        out["differential_privacy"] = {"level": "none"}
    elif isinstance(dp, DPSetting):
        section: dict[str, Any] = {
            "level": dp.level,
            "epsilon_budget": dp.epsilon,
            "delta": dp.delta,
            "accountant": "rdp",
        }
        if dp.level == "user":
            section.update(
                mechanism=[NOISE_MECHANISM[dp.noise]], clipping_norm=dp.clipping_norm, noise_multiplier="auto"
            )
        else:
            section["record"] = {"max_grad_norm": dp.max_grad_norm, "noise_multiplier": "auto"}
        out["differential_privacy"] = section
    if cell.residuals is not None:
        out["residuals"] = {"allowed": cell.residuals}
        if cell.residuals and isinstance(dp, DPSetting) and dp.level == "user":
            # residual embeddings of DP key layers are post-processing: allowed under require_dp
            out["residuals"]["require_dp"] = True
    return out


def _absolute(base: Path, value: str) -> str:
    p = Path(value)
    return str(p if p.is_absolute() else (base / p).resolve())


def write_cell_world(world_path: Path, cell: Cell, protocol_params: dict[str, dict[str, Any]], folder: Path) -> Path:
    """Write ``folder/world.yaml`` (and ``folder/policies/*.yaml``) for ``cell``; returns the world path.

    File paths of the base world (policies, data files, tokenizer, model config) are made absolute or
    re-pointed, so the derived world loads from its own folder.
    """
    raw = yaml.safe_load(world_path.read_text())
    base = world_path.parent
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policies").mkdir(exist_ok=True)
    overrides = policy_overrides(cell, protocol_params)
    derived: dict[Path, str] = {}
    for node in raw.get("nodes", []):
        if not isinstance(node, dict) or "policy" not in node:
            continue
        src = Path(_absolute(base, str(node["policy"])))
        if not overrides:
            node["policy"] = str(src)
            continue
        if src not in derived:
            name = f"{src.stem}-{len(derived)}.yaml" if any(p.stem == src.stem for p in derived) else f"{src.stem}.yaml"
            doc = {
                "apiVersion": "worldlm-secure/v1",
                "kind": "JurisdictionPolicy",
                "name": f"{src.stem}-cell",
                "description": f"{src.name} with the grid cell's variation {cell.cell_id}",
                # extends: must be relative (the loader refuses absolute paths)
                "extends": os.path.relpath(src, folder / "policies"),
                **overrides,
            }
            text = f"# written by `worldlm-secure compare` for cell {cell.cell_id}\n" + yaml.safe_dump(doc, sort_keys=False)
            (folder / "policies" / name).write_text(text)
            derived[src] = f"policies/{name}"
        node["policy"] = derived[src]
        if node.get("data"):
            node["data"] = _absolute(base, str(node["data"]))
    data = raw.get("data") or {}
    files = data.get("files") if isinstance(data, dict) else None
    if isinstance(files, dict):
        for key in ("path", "tokenizer"):
            if files.get(key):
                files[key] = _absolute(base, str(files[key]))
    if isinstance(data, dict) and data.get("tokenizer"):
        data["tokenizer"] = _absolute(base, str(data["tokenizer"]))
    model = raw.get("model") or {}
    if isinstance(model, dict) and model.get("config"):
        model["config"] = _absolute(base, str(model["config"]))
    out = folder / "world.yaml"
    out.write_text(
        f"# {world_path} with the grid cell's variation {cell.cell_id} (written by `worldlm-secure compare`)\n"
        + yaml.safe_dump(raw, sort_keys=False)
    )
    return out
