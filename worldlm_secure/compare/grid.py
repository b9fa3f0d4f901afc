"""The grid file of `worldlm-secure compare`: a base world and the variations to cross.

```yaml
name: pet-study
world: world.yaml            # relative to this file; omitted: the embedded default world
rounds: 4                    # every cell (omitted: the world's schedule.rounds)
protocol_params:             # merged into secure_aggregation.<protocol> of every cell using it
  ckks: {value_bits: 32}
axes:                        # a mapping is one cross product; a list of mappings is a union of them
  protocol: [none, masking, ckks]
  dp: [off, {epsilon: [2, 8], noise: central}, {level: record, epsilon: 8}]
  residuals: [on, off]
  method: [worldlm, fedavg]
  seed: [0, 1]
exclude:                     # drop cells matching every key given (keys: see `Cell.variation`)
  - {protocol: ckks, dp_level: record}
```

An axis left out keeps what the base world's policies say (shown as `base`). Errors name the grid
file, the line and the field, and list the valid keys for a typo, in the mapping and the list form of
`axes` alike, e.g. ``study.yaml:9 axes[1].dp[0].noise: Input should be 'central', ... (got 'local')``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from worldlm_secure.errors import ConfigError
from worldlm_secure.federation.methods import METHODS
from worldlm_secure.federation.world import _where, read_yaml_lines, unknown_key_message

_T = TypeVar("_T")

Protocol = Literal["none", "masking", "ckks"]
NOISE_MECHANISM = {
    "central": "central_gaussian",
    "distributed": "distributed_discrete_gaussian",
    "skellam": "distributed_skellam",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DPVariant(_Strict):
    """One DP setting of the `dp` axis; a list of ε expands to one cell per value."""

    level: Literal["user", "record"] = "user"
    epsilon: Union[float, list[float]] = Field(description="Total ε budget per site stream over the run, at δ.")
    noise: Literal["central", "distributed", "skellam"] = "central"  # user level only
    delta: float = Field(1e-5, gt=0, lt=1)
    clipping_norm: float = Field(1.0, gt=0, description="User level: L2 clip of a site's update per group and round.")
    max_grad_norm: float = Field(1.0, gt=0, description="Record level: L2 clip of one sequence's gradient.")

    @field_validator("epsilon")
    @classmethod
    def _positive(cls, v: float | list[float]) -> float | list[float]:
        values = v if isinstance(v, list) else [v]
        if not values or any(x <= 0 for x in values):
            raise ValueError(f"every ε must be > 0 (got {v!r})")
        return v


class Axes(_Strict):
    protocol: list[Protocol] | None = Field(None, min_length=1)
    dp: list[Union[Literal["off"], DPVariant]] | None = Field(None, min_length=1)
    residuals: list[bool] | None = Field(None, min_length=1)
    method: list[str] | None = Field(None, min_length=1)
    seed: list[int] | None = Field(None, min_length=1)

    @field_validator("method")
    @classmethod
    def _known(cls, v: list[str] | None) -> list[str] | None:
        for m in v or []:
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r} (valid: {', '.join(METHODS)})")
        return v

    @field_validator("dp", mode="before")
    @classmethod
    def _off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off` as False; it means "no DP" here.
        return ["off" if x is False else x for x in v] if isinstance(v, list) else v


class GridFile(_Strict):
    name: str = Field(min_length=1)
    world: str | None = None
    rounds: int | None = Field(None, ge=1)
    device: str = "auto"
    description: str = ""
    protocol_params: dict[Literal["masking", "ckks"], dict[str, Any]] = Field(default_factory=dict)
    axes: Union[Axes, list[Axes]]
    exclude: list[dict[str, Any]] = Field(default_factory=list)


@dataclass(frozen=True)
class DPSetting:
    """One cell's DP: level, ε budget, noise placement (user level), δ and clipping."""

    level: str
    epsilon: float
    noise: str
    delta: float
    clipping_norm: float
    max_grad_norm: float

    @property
    def label(self) -> str:
        eps = f"eps{self.epsilon:g}"
        return f"record-{eps}" if self.level == "record" else f"user-{self.noise}-{eps}"


@dataclass(frozen=True)
class Cell:
    """One point of the grid. ``None`` on an axis: what the base world's policies say."""

    method: str
    protocol: str | None
    dp: DPSetting | None | Literal["off"]
    residuals: bool | None
    seed: int | None

    @property
    def variation(self) -> dict[str, Any]:
        """The cell's coordinates, flat (the CSV's first columns and what `exclude` matches)."""
        dp = self.dp
        return {
            "method": self.method,
            "protocol": self.protocol or "base",
            "dp": "base" if dp is None else ("off" if dp == "off" else dp.label),
            "dp_level": "base" if dp is None else ("none" if dp == "off" else dp.level),
            "noise": dp.noise if isinstance(dp, DPSetting) and dp.level == "user" else "",
            "epsilon_target": dp.epsilon if isinstance(dp, DPSetting) else None,
            "delta": dp.delta if isinstance(dp, DPSetting) else None,
            "residuals": "base" if self.residuals is None else ("on" if self.residuals else "off"),
            "seed": "base" if self.seed is None else self.seed,
        }

    @property
    def cell_id(self) -> str:
        """A readable, file-system-safe name, unique within a grid."""
        v = self.variation
        return "__".join(
            str(x) for x in (v["method"], v["protocol"], v["dp"], f"res-{v['residuals']}", f"seed-{v['seed']}")
        )


@dataclass(frozen=True)
class Grid:
    path: Path
    name: str
    world: Path
    rounds: int | None
    device: str
    description: str
    protocol_params: dict[str, dict[str, Any]]
    cells: tuple[Cell, ...]


def default_world() -> Path:
    """The embedded default world (examples/world.yaml, shipped inside the package)."""
    return Path(__file__).resolve().parent.parent / "assets" / "examples" / "world.yaml"


def _dp_settings(values: list[Any] | None) -> list[DPSetting | None | Literal["off"]]:
    if values is None:
        return [None]
    out: list[DPSetting | None | Literal["off"]] = []
    for v in values:
        if v == "off":
            out.append("off")
            continue
        for eps in v.epsilon if isinstance(v.epsilon, list) else [v.epsilon]:
            out.append(DPSetting(v.level, float(eps), v.noise, v.delta, v.clipping_norm, v.max_grad_norm))
    return out


def _or_base(values: Sequence[_T] | None) -> Sequence[_T | None]:
    """An axis' values, or [None] (what the base world says) when the axis is not given."""
    return values or [None]


def _cross(axes: Axes) -> list[Cell]:
    return [
        Cell(method, protocol, dp, residuals, seed)
        for method, protocol, dp, residuals, seed in itertools.product(
            axes.method or ["worldlm"],
            _or_base(axes.protocol),
            _dp_settings(axes.dp),
            _or_base(axes.residuals),
            _or_base(axes.seed),
        )
    ]


def _same(have: Any, want: Any) -> bool:
    want = "on" if want is True else "off" if want is False else want  # YAML 1.1 on/off
    try:
        return float(have) == float(want)  # `epsilon_target: 2` matches 2.0
    except (TypeError, ValueError):
        return str(have) == str(want)


def _matches(cell: Cell, rule: dict[str, Any]) -> bool:
    v = cell.variation
    return all(_same(v[k], val) for k, val in rule.items())


def _validation_error(path: Path, lines: dict, exc: ValidationError, prefix: str, model: type[BaseModel]) -> ConfigError:
    """The first problem as one line ``file:line field: what (got X)``; a typo lists the valid keys."""
    errors = exc.errors()
    # a dp item that is a mapping failed as a DPVariant: report that, not "Input should be 'off'"
    err = next((e for e in errors if not (e["type"] == "literal_error" and isinstance(e.get("input"), dict))), errors[0])
    loc = prefix
    owner: Any = model
    for part in err["loc"]:
        if isinstance(part, int):
            loc += f"[{part}]"
        elif not (part[:1].isupper() or "[" in part or part.startswith("function-")):  # union-member tags
            loc += f".{part}" if loc else part
            field_info = getattr(owner, "model_fields", {}).get(part) if owner is not None else None
            owner = _model_in(field_info.annotation) if field_info is not None else None
        elif part[:1].isupper():
            owner = {"DPVariant": DPVariant, "Axes": Axes}.get(part, owner)
    if err["type"] == "extra_forbidden":
        key = loc.rsplit(".", 1)[-1]
        valid = getattr(_parent_model(owner, model, err["loc"]), "model_fields", {})
        return ConfigError(f"{_where(path, lines, loc)}: {unknown_key_message(key, valid)}")
    got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
    return ConfigError(f"{_where(path, lines, loc)}: {err['msg']}{got}")


def _model_in(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in getattr(tp, "__args__", ()) or ():
        hit = _model_in(arg)
        if hit is not None:
            return hit
    return None


def _parent_model(owner: Any, model: type[BaseModel], loc: tuple) -> Any:
    """The model whose field set an unknown key was checked against (walk ``loc`` minus its last part)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if isinstance(part, str) and part[:1].isupper():
            current = {"DPVariant": DPVariant, "Axes": Axes}.get(part, current)
            continue
        info = getattr(current, "model_fields", {}).get(part)
        if info is not None:
            current = _model_in(info.annotation) or current
    return current


def load_grid(path: str | Path) -> Grid:
    """Load and expand a grid file; every error names the file, the line and the field and says what is valid."""
    path = Path(path)
    raw, lines = read_yaml_lines(path, "grid file")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping with at least `name:` and `axes:`")
    axes_raw = raw.get("axes")
    axes_list: list[Axes] = []
    if isinstance(axes_raw, list):  # a union of cross products: each item checked as its own mapping
        if not axes_raw:
            raise ConfigError(f"{_where(path, lines, 'axes')}: must be a mapping of axes or a non-empty list of them")
        for i, item in enumerate(axes_raw):
            if not isinstance(item, dict):
                raise ConfigError(f"{_where(path, lines, f'axes[{i}]')}: must be a mapping of axes "
                                  f"(valid: {', '.join(Axes.model_fields)}) (got {item!r})")
            try:
                axes_list.append(Axes(**item))
            except ValidationError as exc:
                raise _validation_error(path, lines, exc, f"axes[{i}]", Axes) from None
    elif axes_raw is not None and not isinstance(axes_raw, dict):
        raise ConfigError(f"{_where(path, lines, 'axes')}: must be a mapping of axes or a list of them "
                          f"(valid axes: {', '.join(Axes.model_fields)}) (got {axes_raw!r})")
    try:
        spec = GridFile(**{**raw, "axes": axes_list} if axes_list else raw)
    except ValidationError as exc:
        raise _validation_error(path, lines, exc, "", GridFile) from None
    keys = set(Cell("worldlm", None, None, None, None).variation)
    for i, rule in enumerate(spec.exclude):
        bad = set(rule) - keys
        if bad:
            raise ConfigError(f"{_where(path, lines, f'exclude[{i}]')}: unknown key {sorted(bad)[0]!r} (valid: {', '.join(sorted(keys))})")
    world = default_world() if spec.world is None else (path.parent / spec.world).resolve()
    if not world.is_file():
        raise ConfigError(f"{_where(path, lines, 'world')}: world file {spec.world!r} not found (looked at {world})")
    cells: dict[str, Cell] = {}
    for axes in spec.axes if isinstance(spec.axes, list) else [spec.axes]:
        for cell in _cross(axes):
            if not any(_matches(cell, rule) for rule in spec.exclude):
                cells.setdefault(cell.cell_id, cell)
    if not cells:
        raise ConfigError(f"{_where(path, lines, 'exclude')}: every cell of the grid is excluded; nothing to run")
    return Grid(path, spec.name, world, spec.rounds, spec.device, spec.description,
                {name: params for name, params in spec.protocol_params.items()}, tuple(cells.values()))
