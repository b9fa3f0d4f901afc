"""Masked secure aggregation, SecAgg+ (Bell et al. 2020, on Bonawitz et al. 2017). Spec: protocols/secagg-plus.md.

One round, per member u (its own keys; the aggregator only routes and adds):
  0. advertise: fresh X25519 keys (enc, mask) and a self-mask seed b_u; the public keys and a commitment to
     b_u are signed with u's Ed25519 identity (`KeyAdvert`).
  1. share keys: Shamir shares (threshold t) of b_u and of the mask private key go, AES-GCM encrypted, to
     u's neighbours in the public k-regular graph (`ShareKeys`).
  2. masked input: y_u = q_u + PRG(b_u) + sum_v +-PRG(s_uv) mod 2^b over neighbours v that shared keys,
     s_uv = HKDF(X25519(mask_u, mask_v)) (`MaskedInput`).
     A member sends it only after it received at least t shares (`ShareDelivery`).
  3. consistency check: the aggregator names the survivors U3 (`SurvivorList`); each survivor signs its
     whole view of the round (roster, advertised U1, U3) with its identity (`SurvivorSignature`).
  4. unmask: with the survivor list the aggregator forwards the signatures (`UnmaskRequest`); a member
     reveals only after it checked enough signatures over exactly its own view (`consistency_threshold`).
     Then for each survivor the neighbours reveal self-mask shares, for each member that dropped after
     sharing they reveal mask-key shares; never both for one member (`UnmaskResponse`).
Every aggregator -> member message is signed with the aggregator's identity and checked by the member
(`RoundConfig.aggregator_key`), so another member cannot forge one. t is taken from the real degree of
the neighbour graph and is always more than half of it.
The aggregator adds the y_u, removes the reconstructed self-masks and the dropped members' pairwise
masks, and decodes the fixed-point sum. It aborts (`SecAggError`, nothing released) when fewer than
min_cohort members survive, a secret has fewer than t shares, or the survivors' graph is disconnected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from worldlm_secure.errors import ConfigError, SecAggError
from worldlm_secure.identity import NodeIdentity, verify_signature
from worldlm_secure.secagg import prg, shamir
from worldlm_secure.secagg.graph import auto_degree, components, neighbour_graph, ring_degree
from worldlm_secure.secagg.masking_messages import (
    AggregatorMessage,
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    Message,
    NeighbourKeys,
    ShareDelivery,
    ShareKeys,
    SurvivorList,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
    pack_words,
)
from worldlm_secure.secagg.protocol import (
    IntegerNoise,
)
from worldlm_secure.secagg.quantize import (
    QuantizationSpec,
    clip_report_units,
    clipped_fraction_from_units,
    dequantize,
    quantize,
)

logger = logging.getLogger(__name__)

Entropy = Callable[[int], bytes]
M = TypeVar("M", bound=Message)
AM = TypeVar("AM", bound=AggregatorMessage)


@dataclass(frozen=True)
class MaskingParams:
    """The policy's `secure_aggregation.masking` section (any object with these attributes works too).

    neighbours: k, or "auto" (2 * ceil(log2 n)); threshold: fraction of the real degree d whose shares
    recover a secret (t = max(floor(d/2) + 1, ceil(threshold * d)); must be > 0.5); bits: b, masks and sums live in Z_2^b; clip_range: inputs are quantized
    within [-clip_range, clip_range].
    """

    clip_range: float
    neighbours: int | Literal["auto"] = "auto"
    threshold: float = 0.67  # same default as the policy schema; > (1 + γ)/2 against an active aggregator
    bits: int = 32


@dataclass(frozen=True)
class RoundConfig:
    """Public parameters of one round, known to every member and to the aggregator."""

    round_id: int
    roster: tuple[str, ...]  # sorted names of everyone invited to the round
    neighbours: int  # d: the real degree of the neighbour graph over the roster
    threshold: int  # t: shares needed to reconstruct one secret, > d/2
    min_cohort: int
    quant: QuantizationSpec
    identity_keys: Mapping[str, bytes] = field(repr=False)  # raw Ed25519 public keys of the roster
    aggregator_key: bytes = field(default=b"", repr=False)  # raw Ed25519 key that signs aggregator messages
    threshold_fraction: float = MaskingParams.threshold  # the policy's f, 0.5 < f <= 1
    # What the round is about beyond its members (over links: the announcement's params, with the served
    # model's SHA-256): in the signed view, so a member reveals only if t_c members were told the same.
    context: bytes = field(default=b"", repr=False)

    def threshold_for(self, n_advertised: int) -> int:
        """t of the graph actually built over the ``n_advertised`` members that advertised keys: a strict
        majority of its real degree d (max(floor(d/2) + 1, ceil(f * d))). Members absent before advertising
        do not raise it, so they cost no dropout tolerance; ``threshold`` is this for the whole roster."""
        d = ring_degree(n_advertised, self.neighbours)
        return min(d, max(d // 2 + 1, math.ceil(self.threshold_fraction * d))) if d else 1

    def consistency_threshold(self, n_advertised: int) -> int:
        """How many distinct survivors must sign the same view before a member reveals any share: a strict
        majority of the members that advertised keys (so two different views cannot both gather enough
        honest signatures), and never fewer than t or min_cohort."""
        return max(self.threshold_for(n_advertised), self.min_cohort, n_advertised // 2 + 1)

    @classmethod
    def build(
        cls,
        params: object,
        round_id: int,
        roster: Sequence[str],
        identity_keys: Mapping[str, bytes],
        min_cohort: int,
        noise: IntegerNoise | None = None,
        *,
        aggregator_key: bytes,
        context: bytes = b"",
    ) -> "RoundConfig":
        """Resolve k, t and the quantization spec from a masking policy section for this roster.

        ``identity_keys`` and ``aggregator_key`` are raw Ed25519 public keys the caller trusts: a member must
        take them from certificates it verified, never from the aggregator's say-so."""
        names = tuple(sorted(roster))
        n = len(names)
        if len(set(names)) != n:
            raise SecAggError(f"round {round_id}: member names are not unique")
        missing = [m for m in names if m not in identity_keys]
        if missing:
            raise ConfigError(f"secagg masking: no Ed25519 identity for member {missing[0]!r}; issue it a node key")
        raw_k = getattr(params, "neighbours", "auto")
        if raw_k == "auto":
            k = auto_degree(n)
        elif isinstance(raw_k, int) and not isinstance(raw_k, bool) and raw_k >= 1:
            k = min(raw_k, n - 1)
        else:
            raise ConfigError(f"secure_aggregation.masking.neighbours: must be a positive int or 'auto' (got {raw_k!r})")
        frac = float(getattr(params, "threshold", MaskingParams.threshold))
        if not 0.5 < frac <= 1.0:
            raise ConfigError(
                f"secure_aggregation.masking.threshold: must be in (0.5, 1] (got {frac}); at or below one half an "
                "aggregator that equivocates can collect both secrets of one member: raise it (default 0.67)"
            )
        if len(aggregator_key) != 32:
            raise ConfigError("secagg masking: the aggregator's Ed25519 public key is missing; members could not check its messages")
        d = ring_degree(n, k)  # an odd k becomes k + 1 real neighbours: t must come from those
        quant = round_quantization(params, n, noise)
        cfg = cls(round_id, names, d, 0, max(1, int(min_cohort)), quant, dict(identity_keys), bytes(aggregator_key), frac,
                  bytes(context))
        return dataclasses.replace(cfg, threshold=cfg.threshold_for(n))

    def share_point(self, member: str) -> int:
        """The Shamir x-coordinate of ``member``'s shares: its 1-based index in the sorted roster."""
        return self.roster.index(member) + 1


def round_quantization(params: object, n_members: int, noise: IntegerNoise | None = None) -> QuantizationSpec:
    """The fixed-point spec of a round of ``n_members`` under a masking policy section, leaving room for
    distributed DP noise when members add it (the release path needs the same scale to account the noise)."""
    bits, clip = int(getattr(params, "bits", 32)), float(getattr(params, "clip_range"))
    if noise is None:
        return QuantizationSpec(bits, clip, n_members)
    return QuantizationSpec(bits, clip, n_members, noise.reserve_units, noise.reserve_per_scale, noise.max_scale)


# ---- key derivations (shared by member, aggregator and the test vectors) --------------------------------


def _ctx(label: bytes, round_id: int, *names: str) -> bytes:
    parts = [label, struct.pack(">Q", round_id)]
    for n in names:
        raw = n.encode()
        parts += [struct.pack(">H", len(raw)), raw]
    return b"".join(parts)


def _agree(private: X25519PrivateKey, peer_public: bytes, peer: str) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError:
        raise SecAggError(f"X25519 public key of {peer!r} is invalid (low order or malformed); refused") from None


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def pairwise_seed(mask_private: X25519PrivateKey, peer_public: bytes, round_id: int, own: str, peer: str) -> bytes:
    """The 32-byte seed of the pairwise mask between ``own`` and ``peer`` (both sides derive the same seed)."""
    lo, hi = sorted((own, peer))
    return _hkdf(_agree(mask_private, peer_public, peer), _ctx(b"worldlm-secagg+/pairwise-mask/v1", round_id, lo, hi))


def share_key(
    enc_private: X25519PrivateKey, peer_public: bytes, round_id: int, sender: str, recipient: str, *, peer: str
) -> bytes:
    """AES-256-GCM key for the shares ``sender`` encrypts to ``recipient`` (one key per direction)."""
    return _hkdf(_agree(enc_private, peer_public, peer), _ctx(b"worldlm-secagg+/share-key/v1", round_id, sender, recipient))


def share_aad(round_id: int, sender: str, recipient: str) -> bytes:
    return _ctx(b"worldlm-secagg+/share-aad/v1", round_id, sender, recipient)


def self_mask_commitment(round_id: int, member: str, seed: bytes) -> bytes:
    return hashlib.sha256(_ctx(b"worldlm-secagg+/self-mask-commit/v1", round_id, member) + seed).digest()


def view_statement(cfg: RoundConfig, advertised: Sequence[str], survivors: Sequence[str]) -> bytes:
    """What a survivor signs in the consistency check: the round, its roster, U1 and U3 (sorted), and the
    SHA-256 of the round's context when it has one."""
    w = [_ctx(b"worldlm-secagg+/survivor-view/v1", cfg.round_id)]
    for names in (cfg.roster, sorted(advertised), sorted(survivors)):
        w.append(_ctx(b"|", len(names), *names))
    if cfg.context:
        w.append(b"|context|" + hashlib.sha256(cfg.context).digest())
    return b"".join(w)


def mask_sign(owner: str, peer: str) -> int:
    """+1 if ``owner`` adds PRG(s_owner,peer), -1 if it subtracts it (the lexicographically larger name)."""
    return 1 if owner < peer else -1


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


def x25519_public_bytes(key: X25519PrivateKey) -> bytes:
    """The raw 32-byte X25519 public key of ``key``."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _check_aggregator(cfg: RoundConfig, msg: AggregatorMessage, member: str) -> None:
    if not verify_signature(cfg.aggregator_key, msg.signature, msg.signed_payload()):
        raise SecAggError(
            f"round {cfg.round_id}: {type(msg).__name__} for {member!r} is not signed by the aggregator "
            "(forged by someone else, or tampered with in transit); refused"
        )


def _check_round(cfg: RoundConfig, msg: Message, who: str) -> None:
    if msg.round_id != cfg.round_id:
        raise SecAggError(
            f"round {cfg.round_id}: {type(msg).__name__} from {who!r} belongs to round {msg.round_id}; "
            "replayed or stale message refused"
        )


def _survivor_split(cfg: RoundConfig, survivors: Sequence[str], graph: Mapping[str, frozenset[str]]) -> None:
    parts = components(survivors, graph)
    if len(parts) > 1:
        raise SecAggError(
            f"round {cfg.round_id}: the survivors' neighbour graph splits into {len(parts)} parts, so unmasking "
            "would reveal partial sums; round aborted, nothing released (raise neighbours)"
        )


# ---- member -------------------------------------------------------------------------------------------


class MaskingMember:
    """One member's side of one round. Methods must be called in order, each at most once."""

    def __init__(
        self,
        identity: NodeIdentity,
        config: RoundConfig,
        *,
        entropy: Entropy = os.urandom,
        noise: IntegerNoise | None = None,
    ) -> None:
        if identity.name not in config.roster:
            raise SecAggError(f"round {config.round_id}: {identity.name!r} is not in the round's roster")
        self.name = identity.name
        self.cfg = config
        self._noise = noise  # distributed DP: this member's integer noise share goes in before masking
        self._identity = identity
        self._entropy = entropy
        self._stage = "new"
        self.clipped_fraction = 0.0

    def _enter(self, expected: str, nxt: str, msg: AggregatorMessage | None = None) -> None:
        if msg is not None:
            _check_round(self.cfg, msg, "the aggregator")
            _check_aggregator(self.cfg, msg, self.name)
        if self._stage != expected:
            raise SecAggError(
                f"round {self.cfg.round_id}: member {self.name!r} got a {nxt} step while at stage "
                f"{self._stage!r}; out-of-order or repeated request refused"
            )
        self._stage = nxt

    def advertise(self) -> KeyAdvert:
        self._enter("new", "advertised")
        self._enc = X25519PrivateKey.from_private_bytes(self._entropy(32))
        self._mask = X25519PrivateKey.from_private_bytes(self._entropy(32))
        self._self_seed = self._entropy(prg.SEED_BYTES)
        unsigned = KeyAdvert(
            self.cfg.round_id,
            self.name,
            x25519_public_bytes(self._enc),
            x25519_public_bytes(self._mask),
            self_mask_commitment(self.cfg.round_id, self.name, self._self_seed),
            b"",
        )
        return dataclasses.replace(unsigned, signature=self._identity.sign(unsigned.signed_payload()))

    def share_keys(self, msg: NeighbourKeys) -> ShareKeys:
        self._enter("advertised", "shared", msg)
        cfg = self.cfg
        advertised = set(msg.advertised)
        if msg.recipient != self.name or self.name not in advertised or not advertised <= set(cfg.roster):
            raise SecAggError(f"round {cfg.round_id}: member {self.name!r} got an inconsistent key list; refused")
        if len(advertised) < cfg.min_cohort:
            raise SecAggError(
                f"round {cfg.round_id}: only {len(advertised)} members advertised keys, below "
                f"min_cohort={cfg.min_cohort}; {self.name!r} stops"
            )
        self._advertised = tuple(sorted(advertised))
        self._graph = neighbour_graph(advertised, cfg.neighbours, cfg.round_id)
        self.neighbours = self._graph[self.name]
        self._peers: dict[str, KeyAdvert] = {}
        for adv in msg.adverts:
            _verify_advert(cfg, adv)
            if adv.member not in self.neighbours or adv.member in self._peers:
                raise SecAggError(f"round {cfg.round_id}: unexpected key advert of {adv.member!r}; refused")
            self._peers[adv.member] = adv
        if set(self._peers) != self.neighbours:
            absent = sorted(self.neighbours - set(self._peers))
            raise SecAggError(f"round {cfg.round_id}: key advert of neighbour {absent[0]!r} is missing; refused")
        self._t = t = cfg.threshold_for(len(advertised))
        if len(self.neighbours) < t:
            raise SecAggError(
                f"round {cfg.round_id}: {self.name!r} has {len(self.neighbours)} neighbours with keys, fewer than "
                f"the threshold t={t}; round aborted"
            )
        order = sorted(self.neighbours)
        xs = [cfg.share_point(v) for v in order]
        seed_shares = shamir.split(self._self_seed, xs, t, entropy=self._entropy)
        key_shares = shamir.split(_raw_private(self._mask), xs, t, entropy=self._entropy)
        out = []
        for v, s_seed, s_key in zip(order, seed_shares, key_shares):
            key = share_key(self._enc, self._peers[v].enc_public, cfg.round_id, self.name, v, peer=v)
            nonce = self._entropy(12)
            ct = AESGCM(key).encrypt(nonce, s_seed.to_bytes() + s_key.to_bytes(), share_aad(cfg.round_id, self.name, v))
            out.append(EncryptedShare(cfg.round_id, self.name, v, nonce, ct))
        return ShareKeys(cfg.round_id, self.name, tuple(out))

    def masked_input(self, msg: ShareDelivery, vector: np.ndarray) -> MaskedInput:
        self._enter("shared", "masked", msg)
        cfg = self.cfg
        if msg.recipient != self.name:
            raise SecAggError(f"round {cfg.round_id}: share delivery for {msg.recipient!r} sent to {self.name!r}")
        self._held: dict[str, tuple[shamir.Share, shamir.Share]] = {}
        for enc in msg.shares:
            _check_round(cfg, enc, enc.sender)
            if enc.recipient != self.name or enc.sender not in self.neighbours or enc.sender in self._held:
                raise SecAggError(f"round {cfg.round_id}: unexpected share ciphertext from {enc.sender!r}; refused")
            key = share_key(self._enc, self._peers[enc.sender].enc_public, cfg.round_id, enc.sender, self.name, peer=enc.sender)
            try:
                plain = AESGCM(key).decrypt(enc.nonce, enc.ciphertext, share_aad(cfg.round_id, enc.sender, self.name))
            except (InvalidTag, ValueError):
                raise SecAggError(
                    f"round {cfg.round_id}: share ciphertext from {enc.sender!r} to {self.name!r} failed "
                    "AES-GCM authentication (tampered or wrong key); round aborted"
                ) from None
            pair = shamir.Share.from_bytes(plain[: shamir.SHARE_BYTES]), shamir.Share.from_bytes(plain[shamir.SHARE_BYTES :])
            if any(s.x != cfg.share_point(self.name) for s in pair):
                raise SecAggError(f"round {cfg.round_id}: shares from {enc.sender!r} are for another holder; refused")
            self._held[enc.sender] = pair
        if len(self._held) < self._t:
            # Fewer than t holders of our secrets: the aggregator could be isolating us (an empty delivery
            # leaves only the self-mask, whose shares it then collects). Bell et al. 2020: abort.
            raise SecAggError(
                f"round {cfg.round_id}: {self.name!r} received shares from only {len(self._held)} neighbours, fewer "
                f"than the threshold t={self._t}; it sends no masked input"
            )
        x = np.asarray(vector, dtype=np.float64)
        if x.ndim != 1 or not np.all(np.isfinite(x)):
            raise SecAggError(f"round {cfg.round_id}: member {self.name!r} input must be a finite 1-D vector")
        q = quantize(x, cfg.quant, rounding_seed=self._entropy(prg.SEED_BYTES))
        self.clipped_fraction = q.clipped_fraction
        logger.info("round %d: %s clipped %.3g of its values at +-%g", cfg.round_id, self.name, q.clipped_fraction, cfg.quant.clip_range)
        words = np.empty(x.size + 1, dtype=cfg.quant.dtype)
        words[:-1] = q.values
        words[-1] = clip_report_units(q.clipped_fraction, cfg.quant)
        if self._noise is not None:
            share = np.asarray(self._noise.sample(cfg.quant.scale, x.size), dtype=np.int64)
            # two's-complement residues: uint64 view, then truncation to the word size, wraps mod 2^b
            words[:-1] += share.view(np.uint64).astype(cfg.quant.dtype)
            # The clipped fraction is data-dependent and would leave un-noised: under DP it stays local (logged).
            words[-1] = 0
        masks = [(self._self_seed, 1)]
        for v in sorted(self._held):  # pairwise masks only with neighbours whose shares arrived (U2)
            seed = pairwise_seed(self._mask, self._peers[v].mask_public, cfg.round_id, self.name, v)
            masks.append((seed, mask_sign(self.name, v)))
        prg.apply_masks(words, masks)
        return MaskedInput(cfg.round_id, self.name, cfg.quant.bits, words.size, pack_words(words, cfg.quant.bits))

    def confirm(self, msg: SurvivorList) -> SurvivorSignature:
        """Check the survivor list and sign this member's whole view of the round (consistency check)."""
        self._enter("masked", "confirmed", msg)
        cfg = self.cfg
        survivors = set(msg.survivors)
        if len(survivors) != len(msg.survivors) or msg.recipient != self.name or self.name not in survivors or not survivors <= set(self._graph):
            raise SecAggError(f"round {cfg.round_id}: member {self.name!r} got an inconsistent survivor list; refused")
        if len(survivors) < cfg.min_cohort:
            raise SecAggError(
                f"round {cfg.round_id}: survivor list of {len(survivors)} is below min_cohort={cfg.min_cohort}; "
                f"{self.name!r} reveals nothing"
            )
        if any(v not in self._held for v in self.neighbours & survivors):
            raise SecAggError(f"round {cfg.round_id}: survivor list names a neighbour that never shared keys; refused")
        _survivor_split(cfg, tuple(survivors), self._graph)
        self._survivors = tuple(sorted(survivors))
        statement = view_statement(cfg, self._advertised, self._survivors)
        return SurvivorSignature(cfg.round_id, self.name, self._identity.sign(statement))

    def unmask(self, msg: UnmaskRequest) -> UnmaskResponse:
        """Reveal shares, after checking that enough survivors signed exactly the view this member signed."""
        self._enter("confirmed", "done", msg)
        cfg = self.cfg
        if msg.recipient != self.name or tuple(sorted(set(msg.survivors))) != self._survivors or len(msg.survivors) != len(self._survivors):
            raise SecAggError(
                f"round {cfg.round_id}: the unmask request to {self.name!r} names other survivors than the list "
                "it signed (equivocation); it reveals nothing"
            )
        if len(msg.confirmations) > len(self._survivors):
            raise SecAggError(f"round {cfg.round_id}: the unmask request to {self.name!r} carries more signatures than survivors; refused")
        statement = view_statement(cfg, self._advertised, self._survivors)
        need = cfg.consistency_threshold(len(self._advertised))
        signers: set[str] = set()
        for signer, sig in msg.confirmations:
            if len(signers) >= need:
                break  # enough: verifying the rest costs ~50 us each and proves nothing more
            if signer in self._survivors and signer not in signers and verify_signature(cfg.identity_keys[signer], sig, statement):
                signers.add(signer)
        if len(signers) < need:
            raise SecAggError(
                f"round {cfg.round_id}: only {len(signers)} survivors signed the view {self.name!r} was shown, "
                f"fewer than the {need} required (a majority of the {len(self._advertised)} that advertised keys); "
                "the aggregator may be telling members different survivor lists, so it reveals nothing"
            )
        survivors = set(self._survivors)
        seeds = tuple((v, s.to_bytes()) for v, (s, _) in sorted(self._held.items()) if v in survivors)
        keys = tuple((v, k.to_bytes()) for v, (_, k) in sorted(self._held.items()) if v not in survivors)
        return UnmaskResponse(cfg.round_id, self.name, seeds, keys)


def _verify_advert(cfg: RoundConfig, adv: KeyAdvert) -> None:
    _check_round(cfg, adv, adv.member)
    pub = cfg.identity_keys.get(adv.member)
    if pub is None:
        raise SecAggError(f"round {cfg.round_id}: key advert from {adv.member!r}, who is not in the roster; refused")
    if len(adv.enc_public) != 32 or len(adv.mask_public) != 32 or not verify_signature(
        pub, adv.signature, adv.signed_payload()
    ):
        raise SecAggError(
            f"round {cfg.round_id}: key advert of {adv.member!r} has a bad signature (forged or swapped keys); refused"
        )


# ---- aggregator ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskingOutcome:
    """What the aggregator releases: the decoded sum and who is in it."""

    total: np.ndarray
    contributors: tuple[str, ...]
    clipped_fraction: float
    recovered_self_masks: int
    recovered_mask_keys: int
    threshold: int = 0  # t of the graph over the members that advertised keys


class MaskingAggregator:
    """The aggregator's side of one round: routes messages, checks them, signs what it sends to members,
    and unmasks the sum. ``identity`` is the aggregator's node identity (its key is the config's
    ``aggregator_key``)."""

    def __init__(self, config: RoundConfig, identity: NodeIdentity) -> None:
        if identity.public_bytes != config.aggregator_key:
            raise ConfigError("secagg masking: the aggregator's identity is not the one the round config names")
        self.cfg = config
        self._identity = identity
        self._stage = "adverts"

    def _sign(self, messages: dict[str, AM]) -> dict[str, AM]:
        return {m: dataclasses.replace(msg, signature=self._identity.sign(msg.signed_payload())) for m, msg in messages.items()}

    def _enter(self, expected: str, nxt: str) -> None:
        if self._stage != expected:
            raise SecAggError(f"round {self.cfg.round_id}: aggregator asked for {nxt!r} at stage {self._stage!r}")
        self._stage = nxt

    def _enough(self, count: int, what: str) -> None:
        if count < self.cfg.min_cohort:
            raise SecAggError(
                f"round {self.cfg.round_id}: only {count} of {len(self.cfg.roster)} members {what}, below "
                f"min_cohort={self.cfg.min_cohort}; round aborted, nothing released"
            )

    def collect_adverts(self, adverts: Sequence[KeyAdvert]) -> dict[str, NeighbourKeys]:
        self._enter("adverts", "shares")
        cfg = self.cfg
        self.adverts: dict[str, KeyAdvert] = {}
        for adv in adverts:
            _verify_advert(cfg, adv)
            if adv.member in self.adverts:
                raise SecAggError(f"round {cfg.round_id}: second key advert from {adv.member!r}; refused")
            self.adverts[adv.member] = adv
        self._enough(len(self.adverts), "advertised keys")
        self.graph = neighbour_graph(self.adverts, cfg.neighbours, cfg.round_id)
        self.threshold = t = cfg.threshold_for(len(self.adverts))
        short = [m for m, nb in self.graph.items() if len(nb) < t]
        if short:
            raise SecAggError(
                f"round {cfg.round_id}: {short[0]!r} has only {len(self.graph[short[0]])} neighbours with keys, "
                f"fewer than the threshold t={t}; round aborted, nothing released"
            )
        advertised = tuple(sorted(self.adverts))
        return self._sign({
            m: NeighbourKeys(cfg.round_id, m, advertised, tuple(self.adverts[v] for v in sorted(self.graph[m])))
            for m in advertised
        })

    def collect_shares(self, messages: Sequence[ShareKeys]) -> dict[str, ShareDelivery]:
        self._enter("shares", "masked")
        cfg = self.cfg
        inbox: dict[str, list[EncryptedShare]] = {}
        senders: set[str] = set()
        for msg in messages:
            _check_round(cfg, msg, msg.sender)
            if msg.sender not in self.adverts or msg.sender in senders:
                raise SecAggError(f"round {cfg.round_id}: unexpected ShareKeys from {msg.sender!r}; refused")
            to = [s.recipient for s in msg.shares]
            if any(s.sender != msg.sender for s in msg.shares) or sorted(to) != sorted(self.graph[msg.sender]):
                raise SecAggError(
                    f"round {cfg.round_id}: ShareKeys from {msg.sender!r} is not one share per neighbour; refused"
                )
            senders.add(msg.sender)
            for s in msg.shares:
                inbox.setdefault(s.recipient, []).append(s)
        self._enough(len(senders), "shared keys")
        self.shared = frozenset(senders)  # U2
        return self._sign(
            {m: ShareDelivery(cfg.round_id, m, tuple(s for s in inbox.get(m, []) if s.sender in senders)) for m in sorted(senders)}
        )

    def collect_masked(self, inputs: Sequence[MaskedInput]) -> dict[str, SurvivorList]:
        self._enter("masked", "unmask")
        cfg = self.cfg
        self.masked: dict[str, np.ndarray] = {}
        length = None
        for msg in inputs:
            _check_round(cfg, msg, msg.member)
            if msg.member not in self.shared or msg.member in self.masked:
                raise SecAggError(f"round {cfg.round_id}: unexpected MaskedInput from {msg.member!r}; refused")
            if msg.bits != cfg.quant.bits or (length is not None and msg.length != length):
                raise SecAggError(
                    f"round {cfg.round_id}: MaskedInput from {msg.member!r} has {msg.bits} bits x {msg.length} "
                    f"values, expected {cfg.quant.bits} bits x {length}; refused"
                )
            length = msg.length
            self.masked[msg.member] = msg.words()
        self._enough(len(self.masked), "sent masked input")
        survivors = tuple(sorted(self.masked))  # U3
        _survivor_split(cfg, survivors, self.graph)
        self.survivors = survivors
        return self._sign({m: SurvivorList(cfg.round_id, m, survivors) for m in survivors})

    def collect_signatures(self, signatures: Sequence[SurvivorSignature]) -> dict[str, UnmaskRequest]:
        """Keep the survivors' valid signatures over the one view all were shown; forward them to every survivor."""
        self._enter("unmask", "confirmed")
        cfg = self.cfg
        statement = view_statement(cfg, tuple(self.adverts), self.survivors)
        valid: dict[str, bytes] = {}
        for msg in signatures:
            _check_round(cfg, msg, msg.sender)
            if msg.sender in self.survivors and msg.sender not in valid and verify_signature(
                cfg.identity_keys[msg.sender], msg.signature, statement
            ):
                valid[msg.sender] = msg.signature
            else:
                logger.warning("round %d: survivor-list signature from %r does not verify; not counted", cfg.round_id, msg.sender)
        need = cfg.consistency_threshold(len(self.adverts))
        if len(valid) < need:
            raise SecAggError(
                f"round {cfg.round_id}: only {len(valid)} survivors signed the survivor list, below the {need} the "
                "consistency check needs; round aborted, nothing released"
            )
        confirmations = tuple(sorted(valid.items()))
        return self._sign({m: UnmaskRequest(cfg.round_id, m, self.survivors, confirmations) for m in self.survivors})

    def finish(self, responses: Sequence[UnmaskResponse]) -> MaskingOutcome:
        self._enter("confirmed", "done")
        cfg = self.cfg
        survivors = set(self.masked)
        dropped = self.shared - survivors
        seed_shares: dict[str, list[shamir.Share]] = {}
        key_shares: dict[str, list[shamir.Share]] = {}
        responders: set[str] = set()
        for msg in responses:
            _check_round(cfg, msg, msg.sender)
            if msg.sender not in survivors or msg.sender in responders:
                raise SecAggError(f"round {cfg.round_id}: unexpected UnmaskResponse from {msg.sender!r}; refused")
            responders.add(msg.sender)
            for pairs, allowed, store in ((msg.self_mask_shares, survivors, seed_shares), (msg.mask_key_shares, dropped, key_shares)):
                for owner, raw in pairs:
                    if owner not in allowed or owner not in self.graph[msg.sender]:
                        raise SecAggError(
                            f"round {cfg.round_id}: {msg.sender!r} returned a share of {owner!r} it should not hold "
                            "or of the wrong kind; refused"
                        )
                    store.setdefault(owner, []).append(shamir.Share.from_bytes(raw))

        def recover(owner: str, store: dict[str, list[shamir.Share]], what: str) -> bytes:
            got = store.get(owner, [])
            if len(got) < self.threshold:
                raise SecAggError(
                    f"round {cfg.round_id}: only {len(got)} of t={self.threshold} shares of the {what} of {owner!r} "
                    "arrived (too many dropouts); round aborted, nothing released"
                )
            try:
                return shamir.combine(got, self.threshold)
            except SecAggError as exc:
                raise SecAggError(f"round {cfg.round_id}: the {what} of {owner!r} is not a valid secret ({exc}); round aborted") from None

        total = np.zeros(next(iter(self.masked.values())).size, dtype=cfg.quant.dtype)
        for words in self.masked.values():
            np.add(total, words, out=total)
        masks: list[tuple[bytes, int]] = []
        for u in sorted(survivors):
            seed = recover(u, seed_shares, "self-mask seed")
            if self_mask_commitment(cfg.round_id, u, seed) != self.adverts[u].self_mask_commitment:
                raise SecAggError(
                    f"round {cfg.round_id}: reconstructed self-mask seed of {u!r} does not match its commitment "
                    "(a share was tampered with); round aborted"
                )
            masks.append((seed, -1))
        recovered_keys = 0
        for v in sorted(dropped):
            partners = sorted(self.graph[v] & survivors)
            if not partners:
                continue  # nobody who contributed masked with v
            mask_key = X25519PrivateKey.from_private_bytes(recover(v, key_shares, "mask key"))
            if x25519_public_bytes(mask_key) != self.adverts[v].mask_public:
                raise SecAggError(
                    f"round {cfg.round_id}: reconstructed mask key of {v!r} does not match its advert "
                    "(a share was tampered with); round aborted"
                )
            recovered_keys += 1
            for u in partners:  # u added mask_sign(u, v) * PRG(s_uv); take it back out
                masks.append((pairwise_seed(mask_key, self.adverts[u].mask_public, cfg.round_id, v, u), -mask_sign(u, v)))
        prg.apply_masks(total, masks)
        units = int(total[-1]) & (2**cfg.quant.bits - 1)
        contributors = tuple(sorted(survivors))
        return MaskingOutcome(
            total=dequantize(total[:-1], cfg.quant),
            contributors=contributors,
            clipped_fraction=clipped_fraction_from_units(units, len(contributors), cfg.quant),
            recovered_self_masks=len(survivors),
            recovered_mask_keys=recovered_keys,
            threshold=self.threshold,
        )
