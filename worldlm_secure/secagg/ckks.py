"""CKKS secure summation (TenSEAL): members encrypt, the aggregator adds ciphertexts it cannot read,
key holders decrypt the sum and confirm it. Spec: protocols/ckks.md.

This module holds the roles, each with only its own keys and every check it makes; `ckks_round` runs
them over a channel (the one member session, the one aggregator driver), `CkksSecureSum` below in process.
- key ceremony (at the start of every key epoch): the generator (first available key holder, sorted)
  makes the key and publishes `EpochKeys` (ckks_keys);
- the round's `RoundSpec` (round, key id, vector length, cohort, packing layout) is computed by every
  party from its own setup;
- each `CkksMember` quantizes, packs and encrypts its vector (one `ckks_vector` per ciphertext, every slot
  used) and first sends only a signed `Commitment` to its ciphertexts; once the aggregator's list of
  commitments checks out (`check_commitments`) it reveals the signed `Contribution`, whose signature also
  covers the list's digest (commit, then reveal: no member can build its contribution from another's);
- the `CkksAggregator` checks each contribution (rejecting it with an error that names the member)
  and forwards the accepted, member-signed ones to the key holders (`SummedCiphertext`);
- every member installs an epoch only when its generator is a key holder its own policy names
  (`EpochTrust`, `check_epoch`);
- every available `CkksKeyHolder` verifies the forwarded contributions (>= min_cohort distinct members,
  each signed for this round and key, each matching its commitment, all revealed under one commitment
  list), adds them itself, decrypts, unpacks the exact integer sums and
  signs a `Confirmation` of their SHA-256; the releaser (first available holder, sorted) sends a
  `DecryptedAggregate` with all confirmations; `verify_aggregate` (run by the aggregator or the parent)
  accepts it only when every confirmation verifies and agrees.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import tenseal as ts

from worldlm_secure.errors import ConfigError, SecAggError
from worldlm_secure.identity import NodeIdentity, verify_signature
from worldlm_secure.secagg import ckks_packing as packing
from worldlm_secure.secagg.ckks_keys import (
    EpochKeys,
    TransportKey,
    load_public_context,
    unwrap_secret_context,
)
from worldlm_secure.secagg.ckks_params import CkksParams
from worldlm_secure.secagg.protocol import SumResult

CONTRIBUTION_LABEL = b"worldlm-secure/ckks/contribution/v1"
CONFIRM_LABEL = b"worldlm-secure/ckks/confirm/v1"
COMMIT_LABEL = b"worldlm-secure/ckks/commit/v1"
COMMITMENTS_LABEL = b"worldlm-secure/ckks/commitments/v1"
MEMBERS_TOKEN = "members"  # policy key_holders entry meaning "every member of the cohort"


class ContributionRejected(SecAggError):
    """One member's contribution was refused; the round goes on without it (if min_cohort allows)."""

    def __init__(self, member: str, reason: str) -> None:
        super().__init__(f"ckks: contribution of member {member!r} rejected: {reason}")
        self.member = member
        self.reason = reason


@dataclass(frozen=True)
class RoundSpec:
    """What the aggregator announces before members encrypt."""

    round_id: int
    key_id: str
    n_values: int
    cohort: tuple[str, ...]
    layout: packing.Layout
    clip_range: float
    slot_count: int
    min_cohort: int = 1
    context: bytes = b""  # SHA-256 of what the round is about beyond its members (over links: the announcement)

    @property
    def n_chunks(self) -> int:
        return -(-self.layout.slots_for(self.n_values) // self.slot_count)

    @classmethod
    def plan(cls, params: CkksParams, round_id: int, key_id: str, n_values: int, cohort: Sequence[str],
             min_cohort: int, context: bytes = b"") -> "RoundSpec":
        """The spec of a round of ``cohort`` under ``params``: the packing leaves headroom for the cohort's sum."""
        layout = packing.plan_layout(params.slot_bits, params.value_bits, packing.headroom_for(len(cohort)))
        return cls(round_id, key_id, n_values, tuple(cohort), layout, params.clip_range, params.slot_count,
                   max(min_cohort, 1), context)


@dataclass(frozen=True)
class Contribution:
    """One member's encrypted vector: serialized ckks_vectors of `slot_count` slots each, signed."""

    round_id: int
    member: str
    key_id: str
    n_values: int
    chunks: tuple[bytes, ...]
    clipped: int
    signature: bytes = b""
    commitments: bytes = b""  # SHA-256 of the commitment list it was revealed under (`commitments_digest`)

    def message(self) -> bytes:
        return (
            CONTRIBUTION_LABEL + b"|" + struct.pack(">QQQQ", self.round_id, self.n_values, len(self.chunks), self.clipped)
            + self.member.encode() + b"|" + self.key_id.encode() + b"|" + chunks_digest(self.chunks) + b"|"
            + self.commitments
        )

    def revealed(self, commitments: bytes, identity: NodeIdentity) -> "Contribution":
        """This contribution bound to the commitment list with digest ``commitments``, signed by ``identity``."""
        c = replace(self, commitments=commitments, signature=b"")
        return replace(c, signature=identity.sign(c.message()))

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)


def chunks_digest(chunks: Sequence[bytes]) -> bytes:
    """SHA-256(SHA-256(chunk_0) || SHA-256(chunk_1) || ...): what a commitment fixes and a contribution signs."""
    h = hashlib.sha256()
    for c in chunks:
        h.update(hashlib.sha256(c).digest())
    return h.digest()


@dataclass(frozen=True)
class Commitment:
    """A member's signed promise, made before it sees anyone's ciphertext: its contribution to this round has
    ``n_chunks`` ciphertexts whose `chunks_digest` is ``digest`` (protocols/ckks.md §4, commit then reveal)."""

    round_id: int
    member: str
    key_id: str
    n_values: int
    n_chunks: int
    digest: bytes
    signature: bytes = b""
    # SHA-256 of the round's context as this member was told it (`RoundSpec.context`; b"" in process): every
    # member and holder checks that all listed commitments carry its own, so one sum's members were told the same
    context: bytes = b""

    def message(self) -> bytes:
        return (
            COMMIT_LABEL + b"|" + struct.pack(">QQQ", self.round_id, self.n_values, self.n_chunks)
            + self.member.encode() + b"|" + self.key_id.encode() + b"|" + self.digest
            + (b"|context|" + self.context if self.context else b"")
        )

    def matches(self, c: "Contribution") -> bool:
        """Whether ``c`` is the contribution this commitment fixed."""
        return ((c.round_id, c.member, c.key_id, c.n_values, len(c.chunks)) ==
                (self.round_id, self.member, self.key_id, self.n_values, self.n_chunks)
                and chunks_digest(c.chunks) == self.digest)


def commitments_digest(commitments: Sequence[Commitment]) -> bytes:
    """The SHA-256 a revealed contribution signs: of the commitment list (each signed commitment, by member)."""
    h = hashlib.sha256(COMMITMENTS_LABEL)
    for c in sorted(commitments, key=lambda c: c.member):
        h.update(hashlib.sha256(c.message()).digest() + c.signature)
    return h.digest()


def commitments_problem(commitments: Sequence[Commitment], trust: "EpochTrust", round_id: int, key_id: str,
                        cohort: Sequence[str], floor: int, context: bytes = b"") -> str | None:
    """Why a commitment list fails the checks a member (before it reveals) and a key holder (before it decrypts)
    make against their own setup, else None: at least ``floor`` commitments, each of a distinct cohort member
    with a verified signing key, signed by it, for this round and key id and under this ``context``."""
    seen: set[str] = set()
    for c in commitments:
        ok = (isinstance(c, Commitment) and isinstance(c.member, str) and isinstance(c.key_id, str)
              and isinstance(c.digest, bytes) and isinstance(c.signature, bytes)
              and all(type(v) is int and 0 <= v < 2**63 for v in (c.round_id, c.n_values, c.n_chunks)))
        if not ok:
            return "a malformed commitment"
        pub = trust.peer_keys.get(c.member)
        if c.member in seen or c.member not in cohort or pub is None:
            return f"the commitment of {c.member!r} is a repeat, or not from a cohort member with a verified key"
        if (c.round_id, c.key_id) != (round_id, key_id):
            return f"the commitment of {c.member!r} is for another round or key"
        if c.context != context:
            return (f"the commitment of {c.member!r} was made under another round context (the aggregator told "
                    "members of one round different things, e.g. served them different models)")
        if not verify_signature(pub, c.signature, c.message()):
            return f"the commitment of {c.member!r} is not signed by {c.member!r}"
        seen.add(c.member)
    if len(seen) < floor:
        return f"a commitment list of {len(seen)} members, below min_cohort={floor}"
    return None


def check_commitments(commitments: Sequence[Commitment], trust: "EpochTrust", round_id: int, key_id: str,
                      cohort: Sequence[str], floor: int, who: str, context: bytes = b"") -> bytes:
    """`commitments_problem` as a `SecAggError` naming ``who``; the list's `commitments_digest` when it passes."""
    problem = commitments_problem(commitments, trust, round_id, key_id, cohort, floor, context)
    if problem:
        raise SecAggError(f"{who}: {problem}; refused")
    return commitments_digest(commitments)


@dataclass(frozen=True)
class SummedCiphertext:
    """What the aggregator sends the key holders: the accepted contributions, each signed by its member.

    The holder re-checks every signature and adds the ciphertexts itself (`CkksKeyHolder.decrypt`), so a
    malicious aggregator cannot have one member's ciphertext (or a sum of fewer than min_cohort members)
    decrypted as "the sum". Cost: k contributions down to each holder instead of one summed ciphertext."""

    round_id: int
    key_id: str
    contributors: tuple[str, ...]
    contributions: tuple[Contribution, ...]
    commitments: tuple[Commitment, ...] = ()  # the commitment list every contribution was revealed under


@dataclass(frozen=True)
class EpochTrust:
    """What a member checks a key epoch and a sum against, all from its own side of the trust boundary:
    ``holders``: the key holders its effective policy names for this cohort; ``peer_keys``: members' Ed25519
    keys (CA-verified certificates over links, the roster in process); ``min_cohort``: its policy's floor."""

    holders: tuple[str, ...]
    peer_keys: Mapping[str, bytes]
    min_cohort: int = 1


def check_epoch(keys: EpochKeys, trust: EpochTrust, me: str) -> bytes:
    """Member-side check of a key epoch before anything is encrypted under it or unwrapped from it: the
    generator and every holder its secret key is sealed to must be key holders the policy names (any of
    them may generate: each holds the full key anyway). Returns the generator's signing key, taken from
    ``trust.peer_keys`` (never from the epoch message); raises SecAggError otherwise."""
    named = ", ".join(trust.holders) or "none"
    if not isinstance(keys, EpochKeys) or keys.generator not in trust.holders:
        raise SecAggError(
            f"ckks member {me!r}: key epoch generated by {getattr(keys, 'generator', None)!r}, not a key holder the "
            f"policy names ({named}); refused, nothing encrypted under it"
        )
    stray = sorted(h for h in keys.wrapped if h not in trust.holders)
    if stray or any(w.holder != h or w.key_id != keys.key_id for h, w in keys.wrapped.items()):
        raise SecAggError(
            f"ckks member {me!r}: key epoch {keys.epoch} seals the secret key to {', '.join(stray) or 'a mislabelled copy'}, "
            f"not key holders the policy names ({named}); refused"
        )
    pub = trust.peer_keys.get(keys.generator)
    if pub is None:
        raise SecAggError(f"ckks member {me!r}: no verified signing key for generator {keys.generator!r}; refused")
    return pub


def contribution_problem(c: Contribution) -> str | None:
    """Why ``c``'s fields cannot be signed or checked (wrong types, out of u64 range), else None."""
    ints = (c.round_id, c.n_values, c.clipped)
    if any(type(v) is not int or not 0 <= v < 2**63 for v in ints):
        return "round_id, n_values and clipped must be integers in [0, 2^63)"
    if (not isinstance(c.member, str) or not isinstance(c.key_id, str) or not isinstance(c.signature, bytes)
            or not isinstance(c.commitments, bytes)):
        return "member and key_id must be strings, the signature and commitment digest bytes"
    if not isinstance(c.chunks, tuple) or not c.chunks or not all(isinstance(b, bytes) for b in c.chunks):
        return "chunks must be a non-empty tuple of bytes"
    try:
        c.member.encode(), c.key_id.encode()
    except UnicodeEncodeError:
        return "member or key_id is not encodable as UTF-8"
    return None


class _Shape:
    """What every ciphertext of an epoch must look like: N/2 slots, one ciphertext of 2 polynomials at the
    data level, scale 2^scale_bits (taken from a fresh encryption under the same context)."""

    def __init__(self, ctx: ts.Context, slot_count: int) -> None:
        ref = ts.ckks_vector(ctx, [0.0]).ciphertext()[0]
        self.slots, self.parms_id, self.scale = slot_count, list(ref.parms_id()), ref.scale

    def load(self, ctx: ts.Context, blob: bytes) -> ts.CKKSVector | None:
        """The vector in ``blob``, or None when it does not load under ``ctx`` or has the wrong shape."""
        try:
            vec = ts.ckks_vector_from(ctx, blob)
            cts = vec.ciphertext()
            ok = (vec.size() == self.slots and len(cts) == 1 and cts[0].size() == 2
                  and list(cts[0].parms_id()) == self.parms_id and cts[0].scale == self.scale)
        except Exception:  # TenSEAL raises ValueError/RuntimeError/TypeError on bad streams
            return None
        return vec if ok else None


@dataclass(frozen=True)
class Confirmation:
    """A key holder's signed statement: this round's sum over `contributors` has this SHA-256."""

    holder: str
    round_id: int
    key_id: str
    contributors: tuple[str, ...]
    digest: bytes
    signature: bytes = b""

    def message(self) -> bytes:
        return (
            CONFIRM_LABEL + b"|" + struct.pack(">Q", self.round_id) + self.key_id.encode() + b"|"
            + ",".join(self.contributors).encode() + b"|" + self.digest
        )


@dataclass(frozen=True)
class DecryptedAggregate:
    """What the releasing key holder sends up: the exact integer sums and every holder's confirmation."""

    round_id: int
    key_id: str
    contributors: tuple[str, ...]
    integer_sums: np.ndarray  # int64, sum over contributors of the unsigned quantized values
    releaser: str
    confirmations: tuple[Confirmation, ...]


def digest_sums(integer_sums: np.ndarray) -> bytes:
    return hashlib.sha256(np.ascontiguousarray(integer_sums, dtype="<i8").tobytes()).digest()


class CkksMember:
    """A member: holds only the verified public context of the current epoch and its identity."""

    def __init__(self, identity: NodeIdentity) -> None:
        self.identity = identity
        self.name = identity.name
        self._ctx: ts.Context | None = None
        self._key_id = ""

    def install(self, keys: EpochKeys, trust: EpochTrust) -> None:
        """Join a key epoch after `check_epoch` (generator named by the policy) and the generator's signature."""
        ctx = load_public_context(keys, check_epoch(keys, trust, self.name))
        self._ctx, self._key_id = ctx, keys.key_id

    @property
    def key_id(self) -> str:
        """The key id of the epoch joined ("" before any)."""
        return self._key_id

    def protect(self, spec: RoundSpec, vector: np.ndarray) -> Contribution:
        """Quantize, pack and encrypt `vector` (one ckks_vector per full ciphertext) and sign the result."""
        if self._ctx is None:
            raise SecAggError(f"ckks member {self.name!r}: no public context installed; join the key epoch first")
        v, clipped = packing.quantize(vector, spec.clip_range, spec.layout.value_bits)
        slots = packing.pack(v, spec.layout)
        s = spec.slot_count
        n_chunks = -(-slots.size // s)
        padded = np.zeros(n_chunks * s)
        padded[: slots.size] = slots
        chunks = tuple(ts.ckks_vector(self._ctx, padded[i * s : (i + 1) * s].tolist()).serialize() for i in range(n_chunks))
        c = Contribution(spec.round_id, self.name, self._key_id, int(np.asarray(vector).size), chunks, clipped)
        return Contribution(c.round_id, c.member, c.key_id, c.n_values, c.chunks, c.clipped, self.identity.sign(c.message()))

    def commit(self, round_id: int, n_values: int, chunks: Sequence[bytes], context: bytes = b"") -> Commitment:
        """The signed commitment to a contribution of ``chunks`` (made before any other member's is seen), under
        the round ``context`` (a SHA-256, or b"") this member was told."""
        c = Commitment(round_id, self.name, self._key_id, n_values, len(chunks), chunks_digest(chunks), context=context)
        return replace(c, signature=self.identity.sign(c.message()))


class CkksAggregator:
    """Adds ciphertexts under the public context; never holds a secret key."""

    def __init__(self, keys: EpochKeys, generator_public: bytes, params: CkksParams) -> None:
        self.key_id = keys.key_id
        self.params = params
        self._ctx = load_public_context(keys, generator_public)
        self._shape = _Shape(self._ctx, params.slot_count)
        if self._shape.scale != 2.0**params.scale_bits:
            raise SecAggError(f"ckks epoch {keys.epoch}: public context has scale {self._shape.scale}, not 2^{params.scale_bits}; refused")
        self._spec: RoundSpec | None = None
        self._commitments: dict[str, Commitment] | None = None
        self._list_digest = b""
        self._accepted: list[Contribution] = []
        self.contributors: list[str] = []
        self.rejected: list[ContributionRejected] = []
        self.clipped = 0

    @property
    def context(self) -> ts.Context:
        return self._ctx

    def open_round(self, spec: RoundSpec, commitments: Sequence[Commitment] | None = None) -> None:
        """Start checking contributions of ``spec``'s round; with ``commitments`` (the list the driver sent the
        members), each must match its member's commitment and be revealed under that list."""
        self._spec, self._accepted, self.contributors, self.rejected, self.clipped = spec, [], [], [], 0
        self._commitments = None if commitments is None else {c.member: c for c in commitments}
        self._list_digest = b"" if commitments is None else commitments_digest(commitments)

    def _load(self, member: str, i: int, blob: bytes) -> None:
        if self._shape.load(self._ctx, blob) is None:
            raise ContributionRejected(
                member, f"ciphertext {i} does not load under the federation context, or has the wrong shape, level "
                f"or scale for key {self.key_id}; re-encrypt with the round spec"
            )

    def accept(self, c: Contribution, member_public: bytes | None) -> None:
        """Add `c` to the running sum, or raise ContributionRejected naming the member (the sum is untouched)."""
        spec = self._spec
        if spec is None:
            raise SecAggError("ckks aggregator: no round open")
        problem = contribution_problem(c) if isinstance(c, Contribution) else "not a Contribution"
        if problem:
            raise ContributionRejected(str(getattr(c, "member", "?")), f"malformed contribution ({problem})")
        m = c.member
        if m not in spec.cohort:
            raise ContributionRejected(m, f"not in the cohort of round {spec.round_id}")
        if m in self.contributors:
            raise ContributionRejected(m, f"second contribution in round {spec.round_id} (replay)")
        if member_public is None or not verify_signature(member_public, c.signature, c.message()):
            raise ContributionRejected(m, "signature does not verify (corrupted or tampered in transit); resend")
        if c.round_id != spec.round_id:
            raise ContributionRejected(m, f"made for round {c.round_id}, this is round {spec.round_id} (replay)")
        if c.key_id != spec.key_id:
            raise ContributionRejected(
                m, f"encrypted under key {c.key_id}, the federation key is {spec.key_id}; fetch the current public context"
            )
        if c.n_values != spec.n_values or len(c.chunks) != spec.n_chunks:
            raise ContributionRejected(
                m, f"wrong-length stream: {c.n_values} values in {len(c.chunks)} ciphertexts, expected "
                f"{spec.n_values} values in {spec.n_chunks}"
            )
        for i, b in enumerate(c.chunks):
            self._load(m, i, b)
        if self._commitments is not None:
            promised = self._commitments.get(m)
            if promised is None or not promised.matches(c):
                raise ContributionRejected(m, "does not match its commitment (a ciphertext made or changed after the "
                                           "commitment list was fixed)")
            if c.commitments != self._list_digest:
                raise ContributionRejected(m, "revealed under another commitment list")
        self._accepted.append(c)
        self.contributors.append(m)
        self.clipped += c.clipped

    def receive(self, c: Contribution, member_public: bytes | None) -> bool:
        """`accept`, recording a rejection instead of raising it; True when accepted."""
        try:
            self.accept(c, member_public)
        except ContributionRejected as exc:
            self.rejected.append(exc)
            return False
        return True

    def summed(self) -> SummedCiphertext:
        spec = self._spec
        if spec is None or not self._accepted:
            raise SecAggError("ckks aggregator: nothing to sum")
        listed = tuple(sorted(self._commitments.values(), key=lambda c: c.member)) if self._commitments else ()
        return SummedCiphertext(spec.round_id, spec.key_id, tuple(self.contributors), tuple(self._accepted), listed)


class CkksKeyHolder:
    """A key holder: its identity, its X25519 transport key, and the secret contexts it unwrapped."""

    def __init__(self, identity: NodeIdentity) -> None:
        self.identity = identity
        self.name = identity.name
        self.transport = TransportKey(identity)
        self._secret: dict[str, ts.Context] = {}
        self._trust: EpochTrust | None = None

    def install(self, keys: EpochKeys, trust: EpochTrust) -> None:
        """Unwrap this epoch's secret key after `check_epoch`; ``trust`` is also what `decrypt` checks sums against."""
        ctx = unwrap_secret_context(keys, self.transport, check_epoch(keys, trust, self.name))
        self._secret, self._trust = {keys.key_id: ctx}, trust

    def _refuse(self, round_id: int, why: str) -> SecAggError:
        return SecAggError(f"key holder {self.name!r}: refuses to decrypt round {round_id}: {why}; nothing released")

    def verified_contributions(self, summed: SummedCiphertext, spec: RoundSpec) -> tuple[Contribution, ...]:
        """The contributions of ``summed`` once each is checked: distinct members of the cohort with a verified
        signing key, signed by that member for this round and key id, the round's length; at least
        max(spec.min_cohort, the holder's own policy min_cohort) of them. Raises SecAggError otherwise."""
        trust = self._trust
        rid = spec.round_id
        if trust is None:
            raise self._refuse(rid, "it joined no key epoch")
        if not isinstance(summed, SummedCiphertext) or summed.round_id != rid or summed.key_id != spec.key_id:
            raise self._refuse(rid, f"the sum is not for the open round {rid} under key {spec.key_id}")
        floor = max(spec.min_cohort, trust.min_cohort, 1)
        seen: list[str] = []
        for c in summed.contributions:
            problem = contribution_problem(c) if isinstance(c, Contribution) else "not a contribution"
            if problem:
                raise self._refuse(rid, f"a malformed contribution ({problem})")
            pub = trust.peer_keys.get(c.member)
            if c.member in seen or c.member not in spec.cohort or pub is None:
                raise self._refuse(rid, f"contribution of {c.member!r} is a repeat, or not from a cohort member with a verified key")
            if (c.round_id, c.key_id, c.n_values, len(c.chunks)) != (rid, spec.key_id, spec.n_values, spec.n_chunks):
                raise self._refuse(rid, f"contribution of {c.member!r} is for another round, key or length")
            if not verify_signature(pub, c.signature, c.message()):
                raise self._refuse(rid, f"contribution of {c.member!r} is not signed by {c.member!r}")
            seen.append(c.member)
        if len(seen) < floor:
            raise self._refuse(rid, f"a sum over {len(seen)} signed contributions, below min_cohort={floor}")
        if tuple(seen) != tuple(summed.contributors):
            raise self._refuse(rid, "the contributor list does not match the signed contributions")
        # commit, then reveal: every contribution is the one its member committed to before any ciphertext was
        # revealed, and all were revealed under this one commitment list (protocols/ckks.md §4, §6)
        problem = commitments_problem(summed.commitments, trust, rid, spec.key_id, spec.cohort, floor, spec.context)
        if problem:
            raise self._refuse(rid, f"commitment list: {problem}")
        listed = commitments_digest(summed.commitments)
        promised = {c.member: c for c in summed.commitments}
        for c in summed.contributions:
            if c.member not in promised or not promised[c.member].matches(c):
                raise self._refuse(rid, f"contribution of {c.member!r} does not match its commitment")
            if c.commitments != listed:
                raise self._refuse(rid, f"contribution of {c.member!r} was revealed under another commitment list")
        # With several holders, each decrypts once per round, but the aggregator could hand each a sum over
        # different members of the same list (all of it to one, all but the victim to another) and subtract.
        # Every honest member reveals under one list only, so holding every sum to the whole list leaves one
        # decryptable sum per round. With one holder its once-per-round rule suffices, and a member whose
        # reveal is rejected is left out as before (protocols/ckks.md §6).
        missing = sorted(set(promised) - set(seen))
        if len(trust.holders) > 1 and missing:
            raise self._refuse(rid, f"the sum leaves out {', '.join(missing)}, committed in its list: with "
                                    f"{len(trust.holders)} key holders every sum must cover the whole list")
        return tuple(summed.contributions)

    def decrypt(self, summed: SummedCiphertext, spec: RoundSpec) -> tuple[np.ndarray, Confirmation]:
        """Check the forwarded contributions (`verified_contributions`), add them itself, decrypt and unpack
        the sum; return the exact integer sums and a signed confirmation."""
        contributions = self.verified_contributions(summed, spec)
        ctx = self._secret.get(summed.key_id)
        if ctx is None:
            raise SecAggError(f"key holder {self.name!r}: no secret key for key id {summed.key_id}; run the key ceremony")
        shape = _Shape(ctx, spec.slot_count)
        total: list[ts.CKKSVector] | None = None
        for c in contributions:
            vecs = [shape.load(ctx, b) for b in c.chunks]
            if any(v is None for v in vecs):
                raise self._refuse(spec.round_id, f"a ciphertext of {c.member!r} does not load under key {summed.key_id}")
            if total is None:
                total = vecs
            else:
                for acc, v in zip(total, vecs):
                    acc.add_(v)
        assert total is not None
        slots = np.concatenate([np.asarray(v.decrypt()) for v in total])
        try:
            sums = packing.unpack_sum(slots, spec.n_values, len(summed.contributors), spec.layout)
        except packing.PackingError as exc:
            raise SecAggError(
                f"key holder {self.name!r}: round {summed.round_id} sum failed its integrity check ({exc}); "
                "a member encrypted under another key or sent out-of-range data; round aborted"
            ) from None
        conf = Confirmation(self.name, summed.round_id, summed.key_id, summed.contributors, digest_sums(sums))
        conf = Confirmation(conf.holder, conf.round_id, conf.key_id, conf.contributors, conf.digest, self.identity.sign(conf.message()))
        return sums, conf


def verify_aggregate(agg: DecryptedAggregate, holder_keys: Mapping[str, bytes], required: Sequence[str]) -> None:
    """Accept a decrypted aggregate only when every holder in `required` confirmed exactly these sums."""
    want = digest_sums(agg.integer_sums)
    seen = {c.holder: c for c in agg.confirmations}
    for h in required:
        c = seen.get(h)
        if c is None:
            raise SecAggError(f"round {agg.round_id}: no confirmation from key holder {h!r}; wait for it or drop it from the quorum")
        pub = holder_keys.get(h)
        ok = (
            pub is not None and verify_signature(pub, c.signature, c.message()) and c.digest == want
            and c.round_id == agg.round_id and c.key_id == agg.key_id and c.contributors == agg.contributors
        )
        if not ok:
            raise SecAggError(
                f"round {agg.round_id}: key holder {h!r} does not confirm the aggregate released by {agg.releaser!r}; "
                "nothing released"
            )


@dataclass(frozen=True)
class CkksSumResult(SumResult):
    """A SumResult that also names the key id and the rejected contributions."""

    key_id: str = ""
    rejected: tuple[str, ...] = ()
    aggregate: DecryptedAggregate | None = field(default=None, repr=False)


def key_holders(params: CkksParams, members: Sequence[str]) -> tuple[str, ...]:
    """The key holders of a cohort: the policy's names among ``members`` ("members" = the whole cohort), else
    the first member in sorted order. A named holder outside the cohort (e.g. the aggregator itself) never
    receives the key; none inside is a `ConfigError`."""
    named = set(params.key_holders) - {MEMBERS_TOKEN}
    if MEMBERS_TOKEN in params.key_holders:
        named |= set(members)  # the policy's "members": every member of the cohort holds the key
    if named:
        inside = named & set(members)
        if not inside:
            raise ConfigError(
                f"secure_aggregation.ckks.key_holders: none of {', '.join(sorted(named))} is a member of this "
                f"round ({', '.join(sorted(members))}); name members of the cohort, never the aggregator"
            )
        return tuple(sorted(inside))
    if not members:
        raise ConfigError("secure_aggregation.ckks.key_holders: no members to choose a key holder from; name one")
    return (sorted(members)[0],)


@dataclass(frozen=True)
class CkksRoundTrace:
    """What one CKKS round produced and measured, wherever its roles ran (one process, or Ray site actors
    around a driver). ``online``: the key holders that decrypted and confirmed, the first one releasing;
    ``up_bytes``: each contribution's ciphertext bytes; seconds are wall time of each role's steps."""

    spec: RoundSpec
    key_id: str
    public_context: bytes
    epoch: int
    new_epoch: bool
    holders: tuple[str, ...]
    online: tuple[str, ...]
    aggregate: DecryptedAggregate
    rejected: tuple[str, ...]
    clipped: int
    up_bytes: tuple[int, ...]
    member_seconds: float
    server_seconds: float
    holder_seconds: float
    uploaded: int = 0  # bytes of every contribution message received (each member's upload)
    bytes_up: Mapping[str, int] = field(default_factory=dict)  # member -> bytes of all its answers
    bytes_down: Mapping[str, int] = field(default_factory=dict)  # member -> bytes of all requests it was sent
