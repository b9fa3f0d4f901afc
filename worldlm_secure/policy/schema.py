"""The jurisdiction policy schema (`apiVersion: worldlm-secure/v1`, `kind: JurisdictionPolicy`).

Every model is strict (no silent type coercion: ``"3"`` is not a number), forbids
unknown keys, and is frozen. Sequences are tuples so policies are hashable and
cannot be edited after validation. The semantics of each field, and how policies
compose along a path, are specified in ``protocols/policy.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Optional, Union, cast

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from worldlm_secure.errors import ConfigError
from worldlm_secure.policy.patterns import FieldProblem, LayerPatterns
from worldlm_secure.secagg.ckks_params import CkksParams as CkksRing

API_VERSION = "worldlm-secure/v1"
KIND = "JurisdictionPolicy"

Protocol = Literal["masking", "ckks", "none"]
DPLevel = Literal["user", "record", "none"]
Mechanism = Literal["central_gaussian", "distributed_discrete_gaussian", "distributed_skellam"]
Accountant = Literal["rdp", "prv"]
Group = Literal["key", "shared", "residual"]
Requirement = Literal["differential_privacy", "secure_aggregation"]
RingDegree = Literal[4096, 8192, 16384, 32768]

# The CKKS ring a policy gets when it names none: the one secagg/ckks_params.py is designed around (N = 4096,
# one 60-bit data prime, scale 2^17: 128-bit security, up to 64 members per sum; protocols/ckks.md §2). One
# home, so what `policy check` accepts and what the protocol packs for cannot drift apart.
_RING = CkksRing()
# Special key-holder name: every contributing member holds the secret key, the aggregator does not. An
# explicit opt-in only: then ANY one member colluding with the aggregator decrypts every contribution.
MEMBERS = "members"
# Masking's Shamir threshold must be a strict majority of a member's neighbours (protocols/policy.md).
MIN_MASKING_THRESHOLD = 0.5
# Special destination name: any node.
ANY = "*"


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


def _unique(values: tuple[str, ...], what: str) -> tuple[str, ...]:
    for v in values:
        if values.count(v) > 1:
            raise ValueError(f"{what} {v!r} is listed twice; list each once")
    return values


class MaskingParams(_Strict):
    """Pairwise masking (SecAgg+) parameters."""

    neighbours: Union[int, Literal["auto"]] = Field(
        default="auto",
        description="Neighbours per member in the k-regular mask graph; 'auto' = O(log n) from the cohort size.",
    )
    threshold: float = Field(
        default=0.67,
        le=1.0,
        description="Fraction of a member's neighbours needed to recover its secrets (Shamir threshold), 0.5 < t <= 1.",
    )
    bits: int = Field(default=32, ge=8, le=62, description="Quantization bits: masks live in Z_2^bits.")
    clip_range: float = Field(
        default=1.0,
        gt=0.0,
        description="Values are quantized within [-clip_range, clip_range]; the clipped fraction is reported.",
    )

    @field_validator("neighbours")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be an integer >= 1 or 'auto' (got {v})")
        return v

    @field_validator("threshold")
    @classmethod
    def _majority(cls, v: float) -> float:
        if not v > MIN_MASKING_THRESHOLD:
            raise ValueError(
                f"must be > {MIN_MASKING_THRESHOLD} (got {v:g}): with half or fewer of a member's neighbours, two "
                "disjoint groups could each reconstruct its secrets and an aggregator could unmask it; use e.g. 0.67 "
                "(and keep max_dropout_fraction < 1 - threshold)"
            )
        return v


class CkksParams(_Strict):
    """CKKS homomorphic encryption (TenSEAL) parameters."""

    poly_modulus_degree: RingDegree = Field(
        default=cast(RingDegree, _RING.poly_modulus_degree), description="Ring degree N; a ciphertext packs N/2 values."
    )
    coeff_mod_bit_sizes: tuple[int, ...] = Field(
        default=_RING.coeff_mod_bit_sizes, min_length=2,
        description="Bit sizes of the coefficient moduli chain (the last is the special prime).",
    )
    scale_bits: int = Field(
        default=_RING.scale_bits, ge=10, le=60,
        description="log2 of the encoding scale; bounds the members per sum (64 at the defaults, protocols/ckks.md §2).",
    )
    key_holders: tuple[str, ...] = Field(
        default=(),
        description=(
            "Nodes that hold the secret key and alone can decrypt (never the aggregator: a named node outside a "
            "round's cohort holds nothing in that round). Empty (the default): ONE holder per round, the first "
            "cohort member in sorted name order. 'members' = every contributing member (explicit opt-in: then any "
            "one member colluding with the aggregator decrypts every contribution)."
        ),
    )
    rotate_every_rounds: int = Field(default=10, ge=1, description="Generate a fresh key pair every this many rounds.")
    clip_range: float = Field(
        default=_RING.clip_range,
        gt=0.0,
        description="Values are quantized within [-clip_range, clip_range] before packing; the clipped fraction is reported.",
    )
    value_bits: int = Field(default=_RING.value_bits, ge=2, le=40, description="Quantization bits per value before packing.")

    @field_validator("coeff_mod_bit_sizes")
    @classmethod
    def _moduli(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        for bits in v:
            if not 20 <= bits <= 60:
                raise ValueError(f"each modulus must be 20..60 bits (got {bits})")
        return v

    @field_validator("key_holders")
    @classmethod
    def _holders(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if any(not h.strip() for h in v):
            raise ValueError("a key holder name must not be empty")
        return _unique(v, "key holder")

    @model_validator(mode="after")
    def _security(self) -> CkksParams:
        inner = self.coeff_mod_bit_sizes[1:-1]
        if inner and self.scale_bits > min(inner):
            raise FieldProblem(
                "scale_bits",
                f"must be <= the smallest inner modulus ({min(inner)} bits) (got {self.scale_bits})",
            )
        # The protocol's own rules (128-bit modulus budget, noise budget, usable slot width), so `policy check FILE`
        # refuses a ring the protocol would refuse at world load; the cohort-size limit needs the world.
        ring = CkksRing(self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.scale_bits, (), 0,
                        self.clip_range, self.value_bits)
        try:
            ring.validate()
        except ConfigError as exc:
            prefix, _, why = str(exc).partition(": ")
            raise FieldProblem(prefix.rsplit(".", 1)[-1], why) from None
        return self


class SecureAggregation(_Strict):
    """How a cohort's contributions are summed without revealing any one of them."""

    protocol: tuple[Protocol, ...] = Field(
        default=("masking",),
        min_length=1,
        description="Acceptable protocols in preference order (one name or a list): masking | ckks | none.",
    )
    min_cohort: int = Field(default=3, ge=1, description="Never release an aggregate of fewer contributors.")
    max_dropout_fraction: float = Field(
        default=0.3, ge=0.0, lt=1.0, description="Largest fraction of a cohort that may drop out of a round."
    )
    masking: MaskingParams = Field(default_factory=MaskingParams)
    ckks: CkksParams = Field(default_factory=CkksParams)

    @field_validator("protocol", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return (v,) if isinstance(v, str) else v

    @field_validator("protocol")
    @classmethod
    def _no_repeats(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _unique(v, "protocol")

    @model_validator(mode="after")
    def _recoverable(self) -> SecureAggregation:
        if "masking" in self.protocol and self.masking.threshold > 1.0 - self.max_dropout_fraction + 1e-12:
            raise FieldProblem(
                "masking.threshold",
                f"must be <= 1 - max_dropout_fraction = {1.0 - self.max_dropout_fraction:g} so the dropouts "
                f"you tolerate can be recovered (got {self.masking.threshold:g})",
            )
        return self


class RecordDP(_Strict):
    """Record-level DP (Opacus DP-SGD inside the site)."""

    max_grad_norm: float = Field(default=1.0, gt=0.0, description="Per-sample gradient clipping norm (L2).")
    noise_multiplier: Union[float, Literal["auto"]] = Field(
        default="auto", description="DP-SGD noise multiplier, or 'auto' = derived from the budget and planned steps."
    )
    epsilon_budget: float | None = Field(
        default=None, gt=0.0, description="Record-level ε budget at the policy's δ; defaults to the policy's budget."
    )

    @field_validator("noise_multiplier")
    @classmethod
    def _positive(cls, v: float | str) -> float | str:
        if isinstance(v, float) and v <= 0:
            raise ValueError(f"must be > 0 or 'auto' (got {v:g})")
        return v


class DifferentialPrivacy(_Strict):
    """Differential privacy on what leaves the site."""

    level: DPLevel = Field(
        default="none",
        description="user = DP-FedAvg on each release; record = DP-SGD inside the site; none = no DP.",
    )
    mechanism: tuple[Mechanism, ...] = Field(
        default=("central_gaussian",),
        min_length=1,
        description="Acceptable noise mechanisms in preference order (one name or a list).",
    )
    epsilon_budget: float | None = Field(default=None, gt=0.0, description="Total ε over the whole run, at δ.")
    delta: float | None = Field(default=None, gt=0.0, lt=1.0, description="δ of the (ε, δ) guarantee.")
    clipping_norm: float = Field(default=1.0, gt=0.0, description="L2 clip of each user's update (user level).")
    noise_multiplier: Union[float, Literal["auto"]] = Field(
        default="auto",
        description="Noise std / clipping_norm, or 'auto' = derived from epsilon_budget, delta and planned rounds.",
    )
    accountant: Accountant = Field(default="rdp", description="Privacy accountant: rdp | prv (Opacus).")
    record: RecordDP | None = Field(
        default=None, description="Record-level DP-SGD settings; required in effect when level is record."
    )

    @field_validator("mechanism", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return (v,) if isinstance(v, str) else v

    @field_validator("mechanism")
    @classmethod
    def _no_repeats(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _unique(v, "mechanism")

    @field_validator("noise_multiplier")
    @classmethod
    def _positive(cls, v: float | str) -> float | str:
        if isinstance(v, float) and v <= 0:
            raise ValueError(f"must be > 0 or 'auto' (got {v:g})")
        return v

    @model_validator(mode="after")
    def _budget_when_on(self) -> DifferentialPrivacy:
        if self.level != "none":
            if self.epsilon_budget is None:
                raise FieldProblem("epsilon_budget", f"required when level is {self.level} (e.g. 8.0)")
            if self.delta is None:
                raise FieldProblem("delta", f"required when level is {self.level} (e.g. 1e-5)")
        return self


class Residuals(_Strict):
    """Residual layer embeddings shared across federations."""

    allowed: bool = Field(default=False, description="Whether residual embeddings of key layers may leave.")
    rank: int = Field(default=8, ge=1, le=4096, description="Largest rank of the low-rank residual embedding.")
    gain: float = Field(default=0.5, ge=0.0, le=1.0, description="How much of the siblings' blend is mixed in, 0..1.")
    require_dp: bool = Field(default=True, description="Residuals may leave only under differential privacy.")


Relation = Literal["parent", "ancestors", "root"]
# Destinations by relation are read from the releasing node (the sender): `parent` is the node it sends to,
# `ancestors` every node above it up to the root, `root` the root. `jurisdiction: X` is every node above the
# sender whose policy declares `jurisdiction: X` (compared without case). See protocols/policy.md.
RELATIONS: tuple[str, ...] = ("parent", "ancestors", "root")


def same_jurisdiction(a: str, b: str) -> bool:
    """Jurisdictions compare without case and surrounding spaces (`EU` is `eu`)."""
    return a.strip().casefold() == b.strip().casefold()


class Destination(_Strict):
    """Who may receive data governed by this policy, and which groups: ONE of name, relation, jurisdiction."""

    name: Optional[str] = Field(
        default=None, min_length=1, description="A node name in the world, or a glob ('*' = any node)."
    )
    relation: Optional[Relation] = Field(
        default=None,
        description=(
            "A node by its place relative to the releasing node: parent | ancestors (every node above it, up to "
            "the root) | root. Lets one policy govern any tree."
        ),
    )
    jurisdiction: Optional[str] = Field(
        default=None,
        min_length=1,
        description="Every node above the releasing node whose policy declares this jurisdiction (e.g. EU).",
    )
    groups: tuple[Group, ...] = Field(
        default=("key", "shared", "residual"), min_length=1, description="What may be sent there."
    )

    @field_validator("groups")
    @classmethod
    def _no_repeats(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _unique(v, "group")

    @model_validator(mode="after")
    def _exactly_one(self) -> Destination:
        given = [k for k in ("name", "relation", "jurisdiction") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of name (a node), relation (parent | ancestors | root) or jurisdiction "
                f"(e.g. EU) per destination (got {', '.join(given) if given else 'none'})"
            )
        return self

    @property
    def label(self) -> str:
        """How the destination reads in messages: `eu`, `parent`, `ancestors`, `root`, `jurisdiction EU`."""
        if self.name is not None:
            return self.name
        if self.relation is not None:
            return self.relation
        return f"jurisdiction {self.jurisdiction}"

    @property
    def token(self) -> str:
        """What stands for the destination in composed rules until it is resolved against a world (never a node)."""
        if self.name is not None:
            return self.name
        if self.relation is not None:
            return f"@{self.relation}"
        return f"@jurisdiction={self.jurisdiction}"


class Egress(_Strict):
    """Where data governed by this policy may go, and what every release must carry."""

    destinations: tuple[Destination, ...] = Field(
        default=(),
        description=(
            "Who may receive data governed by this policy: 'name', or {name | relation | jurisdiction, groups}."
        ),
    )
    require: tuple[Requirement, ...] = Field(
        default=(), description="Protections every release must carry: differential_privacy, secure_aggregation."
    )

    @field_validator("destinations", mode="before")
    @classmethod
    def _names_or_maps(cls, v: object) -> object:
        if isinstance(v, (list, tuple)):
            return tuple({"name": d} if isinstance(d, str) else d for d in v)
        return v

    @field_validator("destinations")
    @classmethod
    def _no_repeats(cls, v: tuple[Destination, ...]) -> tuple[Destination, ...]:
        _unique(tuple(d.label for d in v), "destination")
        return v

    @field_validator("require")
    @classmethod
    def _no_repeat_reqs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _unique(v, "requirement")


class Audit(_Strict):
    """What must be recorded about every release."""

    ledger: bool = Field(default=True, description="Every release is written to the node's privacy ledger.")
    signing: bool = Field(default=True, description="Ledger entries are signed with the node's Ed25519 key.")
    retention_days: int = Field(default=365, ge=0, description="Keep ledger entries at least this many days.")


class Policy(_Strict):
    """A jurisdiction policy as written in one YAML file (after `extends:` is resolved)."""

    apiVersion: Literal["worldlm-secure/v1"] = Field(description="Schema version: worldlm-secure/v1.")
    kind: Literal["JurisdictionPolicy"] = Field(description="Always JurisdictionPolicy.")
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Short policy name.")
    jurisdiction: str = Field(
        min_length=1,
        description=(
            "The jurisdiction this policy implements (e.g. EU); a destination `jurisdiction: EU` in any policy "
            "names the nodes whose policy declares it."
        ),
    )
    description: str = Field(default="", description="Free text for humans.")
    extends: str | None = Field(
        default=None, description="Relative path of a base policy; this file's fields override the base's."
    )
    layers: LayerPatterns = Field(default_factory=LayerPatterns)
    secure_aggregation: SecureAggregation = Field(default_factory=SecureAggregation)
    differential_privacy: DifferentialPrivacy = Field(default_factory=DifferentialPrivacy)
    residuals: Residuals = Field(default_factory=Residuals)
    egress: Egress = Field(default_factory=Egress)
    audit: Audit = Field(default_factory=Audit)

    # Where the policy was loaded from, and the (file, line) of every field path (set by load_policy).
    _source: Path | None = PrivateAttr(default=None)
    _where: dict[tuple[Any, ...], tuple[str, int]] = PrivateAttr(default_factory=dict)
    # The node this copy governs and its ancestors up to the root (set by `bound`); relations resolve against it.
    _path: tuple[str, ...] | None = PrivateAttr(default=None)

    def bound(self, path: Sequence[str]) -> Policy:
        """A copy of this policy attached to a node: ``path`` is the node's name, then its ancestors to the root.

        Composition reads the releasing node's place in the tree from the first policy of a chain, so destinations
        by relation (parent, ancestors, root) and by jurisdiction resolve to node names. See `bind_chain`.
        """
        copy = self.model_copy()
        copy._source, copy._where = self._source, self._where
        copy._path = tuple(path)
        return copy

    @property
    def path(self) -> tuple[str, ...] | None:
        """The node this policy is attached to and its ancestors (None: not attached to a world)."""
        return self._path

    @property
    def source(self) -> str:
        """The file this policy was loaded from (or its name, for a policy built in code)."""
        return str(self._source) if self._source is not None else f"<policy {self.name}>"

    def where(self, dotted: str) -> str:
        """`file:line` where field `dotted` (e.g. "differential_privacy.delta") was written, or the file."""
        parts = tuple(dotted.split(".")) if dotted else ()
        for n in range(len(parts), -1, -1):
            hit = self._where.get(parts[:n])
            if hit:
                return f"{hit[0]}:{hit[1]}"
        return self.source

    @model_validator(mode="after")
    def _consistent(self) -> Policy:
        sa, dp, eg = self.secure_aggregation, self.differential_privacy, self.egress
        if "secure_aggregation" in eg.require and "none" in sa.protocol:
            raise FieldProblem(
                "secure_aggregation.protocol",
                "'none' is not allowed when egress.require lists secure_aggregation; use masking or ckks",
            )
        if "secure_aggregation" in eg.require and sa.min_cohort < 2:
            raise FieldProblem(
                "secure_aggregation.min_cohort",
                f"must be >= 2 when egress.require lists secure_aggregation (got {sa.min_cohort})",
            )
        if "differential_privacy" in eg.require and dp.level == "none":
            raise FieldProblem(
                "differential_privacy.level",
                "must be user or record when egress.require lists differential_privacy (got none)",
            )
        if dp.delta is not None and dp.delta >= 1.0 / sa.min_cohort:
            raise FieldProblem(
                "differential_privacy.delta",
                f"must be < 1/min_cohort = {1.0 / sa.min_cohort:g} (got {dp.delta:g})",
            )
        if self.residuals.allowed and self.residuals.require_dp and dp.level == "none":
            raise FieldProblem(
                "residuals.require_dp",
                "residuals require DP but differential_privacy.level is none; enable DP or set residuals.allowed: false",
            )
        return self
