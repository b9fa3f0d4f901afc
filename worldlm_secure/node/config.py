"""`node.yaml`: what one running node needs to know about itself.

Everything about the *world* (model, data, schedule, seed, the tree and every node's policy) comes
from the world YAML that all nodes share, so that every node builds the identical model and each
site its identical data partition. The node file says who this node is and where its keys, state
and peers are. Relative paths are resolved against the node file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from worldlm_secure.errors import ConfigError

Role = Literal["site", "federation", "root"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ParentSection(_Strict):
    """The federation this node dials (sites and federations). ``credentials``: the folder `keys issue`
    wrote with the parent's CA (ca.crt = the parent CA, tls.crt/tls.key = this node's certificate)."""

    name: str
    address: str  # host:port
    credentials: Path


class ServeSection(_Strict):
    """What a federation or root serves to its children. ``credentials``: issued by this node's own CA;
    ``roster``: one admitted member name per line."""

    listen: str = "127.0.0.1:0"  # host:port; port 0 picks a free one (written to STATE/address)
    credentials: Path
    roster: Path


class TimeoutSection(_Strict):
    """Seconds. ``train``: how long a federation waits for members' first message of a round (it covers
    their local training, and for the root the federations' whole sub-rounds); ``step``: every later
    step of a secure-aggregation round; ``heartbeat``: how often members say they are alive;
    ``enroll``: how long an aggregator waits for its roster to enroll before the first round; ``dropout``:
    heartbeat silence after which an aggregator stops waiting for a member (default 3 * heartbeat + 2)."""

    train: float = Field(600.0, gt=0)
    step: float = Field(60.0, gt=0)
    heartbeat: float = Field(5.0, gt=0)
    enroll: float = Field(300.0, gt=0)
    dropout: float | None = Field(None, gt=0)  # heartbeat silence after which a member counts as dropped (default 3*heartbeat + 2)

    @property
    def silent_after(self) -> float:
        return self.dropout if self.dropout is not None else 3 * self.heartbeat + 2.0


class NodeConfig(_Strict):
    """One node. ``world``: the shared world YAML; ``state``: this node's folder (round state, checkpoints,
    ledger); ``ledger``: the ledger folder (default STATE/ledger; the file is NODE.sqlite in it)."""

    name: str
    role: Role
    world: Path
    state: Path
    ledger: Path | None = None
    parent: ParentSection | None = None
    serve: ServeSection | None = None
    device: str = "cpu"
    timeouts: TimeoutSection = Field(default_factory=TimeoutSection)
    source: Path = Field(default=Path("."), exclude=True)  # the node file itself (for messages)

    @property
    def ledger_dir(self) -> Path:
        return self.ledger if self.ledger is not None else self.state / "ledger"


def _resolve(base: Path, raw: dict[str, Any]) -> dict[str, Any]:
    def rel(v: Any) -> Any:
        return str((base / v).resolve()) if isinstance(v, str) and not Path(v).is_absolute() else v

    out = dict(raw)
    for key in ("world", "state", "ledger"):
        if key in out:
            out[key] = rel(out[key])
    for section, keys in (("parent", ("credentials",)), ("serve", ("credentials", "roster"))):
        if isinstance(out.get(section), dict):
            sec = dict(out[section])
            for k in keys:
                if k in sec:
                    sec[k] = rel(sec[k])
            out[section] = sec
    return out


def load_node_config(path: str | Path) -> NodeConfig:
    """Parse and check ``path``; every error names the file, the field and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: node config not found; pass --config with the node's node.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: must be a mapping with name, role, world, state, ...")
    try:
        cfg = NodeConfig.model_validate({**_resolve(path.parent.resolve(), raw), "source": path})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        hint = {
            "extra_forbidden": "unknown field; remove it (fields: name, role, world, state, ledger, parent, serve, device, timeouts)",
            "missing": "required field is missing",
        }.get(err["type"], err["msg"])
        raise ConfigError(f"{path} {field}: {hint}") from None
    where = f"{path}"
    if cfg.role in ("site", "federation") and cfg.parent is None:
        raise ConfigError(f"{where} parent: a {cfg.role} dials its federation; add parent: {{name, address, credentials}}")
    if cfg.role == "root" and cfg.parent is not None:
        raise ConfigError(f"{where} parent: the root has no parent; remove the section")
    if cfg.role in ("federation", "root") and cfg.serve is None:
        raise ConfigError(f"{where} serve: a {cfg.role} serves its children; add serve: {{listen, credentials, roster}}")
    if cfg.role == "site" and cfg.serve is not None:
        raise ConfigError(f"{where} serve: a site connects outbound only and serves nothing; remove the section")
    if not cfg.world.is_file():
        raise ConfigError(f"{where} world: world file {cfg.world} not found; point it at the world YAML every node shares")
    return cfg
