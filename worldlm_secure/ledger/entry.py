"""One ledger entry = one release: what left which node, to whom, under which guarantee.

The entry's *canonical bytes* are JSON with sorted keys, no whitespace, ASCII only, and
floats written as Python's shortest round-trip `repr` (so every float is exact and there is
exactly one encoding). `entry_hash` = SHA-256 of the canonical bytes of every field except
`entry_hash` and `signature`; the signature is Ed25519 over
`b"worldlm-secure ledger entry v1\\n" + canonical bytes` (the prefix separates this use of
the node key from its other uses). See protocols/ledger.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from worldlm_secure.errors import LedgerError

GENESIS_HASH = "0" * 64
SIGNATURE_CONTEXT = b"worldlm-secure ledger entry v1\n"
ExtraValue = Union[str, int, float, bool]



# The mechanism of a release computed only from DP-noised aggregates (e.g. a federation releasing its
# round average upward): DP holds by post-processing, so it spends no budget and has no ε of its own.
POST_PROCESSING = "post_processing"
# The mechanism of a record-level release: the site trained with Opacus DP-SGD (its stream is SITE/record,
# charged with the optimizer steps taken since the site's previous release; see protocols/dp.md).
DP_SGD = "dp_sgd"
# The mechanism of a refusal entry: a release (or a DP-SGD training round) the budget could not afford was
# refused before anything left. Nothing was released and no ε was spent (dp_level none, ε fields null); the
# entry is signed and chained like any other so an auditor sees the refusal, and `extra["refused"]` says why.
REFUSED = "refused"
# Release-id suffixes: the DP-SGD companion entry of a release noised at user level too
# (`release.Pipeline.record_dp_sgd`), and a refusal entry (`release.Pipeline.record_refusal`).
RECORD_SUFFIX = ":record"
REFUSED_SUFFIX = ":refused"

@dataclass(frozen=True)
class LedgerEntry:
    """A release record. The engine fills the content fields; `Ledger.append` fills the seal fields."""

    # --- content: what was released (filled by the releasing node) ---
    release_id: str  # idempotency key, e.g. f"{round}:{group}:{destination}"
    round: int
    stream: str  # budget stream the release is charged to (releases on one stream compose)
    level: str  # tier of the releasing node: site | federation | root
    source: str  # releasing node
    destination: str
    group: str  # key | shared | residual
    tensor_names: tuple[str, ...]
    protocol: str  # secure aggregation: masking | ckks | none
    cohort_size: int  # members planned for the round
    dropouts: int  # members that dropped (cohort_size - dropouts contributed)
    dp_level: str  # user | record | none
    mechanism: str  # central_gaussian | distributed_* | dp_sgd | post_processing | refused | none
    clipping_norm: float  # L2 clip (parameter units); max_grad_norm for record level
    noise_multiplier: float  # EFFECTIVE z fed to the accountant (after dropouts); 0.0 when dp_level is none
    sample_rate: float  # q: cohort/population (user level) or batch/records (record level)
    steps: int  # compositions in this release (1 per user-level release; optimizer steps for DP-SGD)
    accountant: str  # rdp | prv | none
    delta: float  # δ of every ε below
    epsilon: float | None  # ε of this release alone, at δ (None when dp_level is none)
    epsilon_cumulative: float | None  # ε of the whole stream so far, this release included, at δ
    epsilon_budget: float | None  # the effective policy's budget for the stream, at δ
    policy_sha256: str  # hex SHA-256 of the effective policy's canonical JSON
    code_version: str
    key_id: str = ""  # e.g. the CKKS key id of the context used
    extra: Mapping[str, ExtraValue] = field(default_factory=dict)
    # hex SHA-256 of the base weights the node trained from (`model.pretrained.base_weights_hash`); "" in
    # entries written before it was recorded, and then absent from the body, so those still verify
    base_hash: str = ""
    # --- seal: filled by Ledger.append ---
    seq: int = -1
    timestamp: str = ""  # UTC, ISO 8601
    prev_hash: str = ""
    public_key: str = ""  # hex of the signer's raw Ed25519 public key
    entry_hash: str = ""
    signature: str = ""  # hex

    def __post_init__(self) -> None:
        # Normalise numbers so that 1 and 1.0 cannot give two encodings of one entry.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if _base_type(f.name) is float and isinstance(v, int) and not isinstance(v, bool):
                object.__setattr__(self, f.name, float(v))
        object.__setattr__(self, "tensor_names", tuple(self.tensor_names))
        object.__setattr__(self, "extra", types.MappingProxyType(dict(self.extra)))

    # ---- encoding --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["tensor_names"] = list(self.tensor_names)
        d["extra"] = dict(self.extra)
        return d

    def body_bytes(self) -> bytes:
        """Canonical bytes of everything but `entry_hash` and `signature` (what is hashed and signed).
        An empty `base_hash` is left out: an entry written before the field existed has one encoding still."""
        d = self.to_dict()
        del d["entry_hash"], d["signature"]
        if not d["base_hash"]:
            del d["base_hash"]
        return canonical_json(d)

    def compute_hash(self) -> str:
        return hashlib.sha256(self.body_bytes()).hexdigest()

    def signed_message(self) -> bytes:
        return SIGNATURE_CONTEXT + self.body_bytes()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LedgerEntry":
        """Strictly typed decoding: unknown, missing or mistyped fields raise LedgerError."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(d) - set(names)
        if unknown:
            raise LedgerError(f"unknown field(s) {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, f in names.items():
            if name not in d:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise LedgerError(f"missing field {name!r}")
                continue
            kwargs[name] = _check_type(name, d[name])
        return cls(**kwargs)


_HINTS: dict[str, Any] = {}


def _hints() -> dict[str, Any]:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(LedgerEntry))
    return _HINTS


def _base_type(name: str) -> Any:
    """The non-None type of field `name` (float for `float | None`)."""
    t = _hints()[name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    if typing.get_origin(t) in (Union, types.UnionType) and len(args) == 1:
        return args[0]
    return t


def _check_type(name: str, v: Any) -> Any:
    t = _hints()[name]
    optional = type(None) in typing.get_args(t)
    if v is None:
        if optional:
            return None
        raise LedgerError(f"field {name!r} must not be null")
    base = _base_type(name)
    if base is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise LedgerError(f"field {name!r} must be a finite number (got {v!r})")
        return float(v)
    if base is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise LedgerError(f"field {name!r} must be an integer (got {v!r})")
        return v
    if base is str:
        if not isinstance(v, str):
            raise LedgerError(f"field {name!r} must be a string (got {v!r})")
        return v
    if name == "tensor_names":
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise LedgerError("field 'tensor_names' must be a list of strings")
        return tuple(v)
    if name == "extra":
        if not isinstance(v, dict) or not all(
            isinstance(k, str) and isinstance(x, (str, int, float, bool)) for k, x in v.items()
        ):
            raise LedgerError("field 'extra' must map strings to str/int/float/bool")
        return v
    raise LedgerError(f"field {name!r} has an unsupported type")  # pragma: no cover


def canonical_json(obj: Any) -> bytes:
    """Sorted keys, no whitespace, ASCII, shortest round-trip floats, NaN/inf refused."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    except ValueError as exc:
        raise LedgerError(f"ledger entry cannot be encoded canonically ({exc})") from None


def entry_from_body(body: bytes, entry_hash: str, signature: str) -> LedgerEntry:
    """Decode stored canonical bytes (raises LedgerError when not valid canonical JSON of an entry)."""
    try:
        d = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerError(f"body is not valid JSON ({exc.__class__.__name__})") from None
    if not isinstance(d, dict):
        raise LedgerError("body is not a JSON object")
    if "entry_hash" in d or "signature" in d:
        raise LedgerError("body must not contain entry_hash or signature")
    e = LedgerEntry.from_dict({**d, "entry_hash": entry_hash, "signature": signature})
    if e.body_bytes() != body:
        raise LedgerError("body is not in canonical form")
    return e
