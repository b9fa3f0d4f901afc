"""A malicious SecAgg+ aggregator for tests: it drives real `MaskingMember`s, lies to them as it likes
(withholds shares, shows different members different survivor lists, replays), signs its lies with the
aggregator key it really holds, and then tries to recover one member's input from what it collected.

`Attack.run` plays one round with a `Strategy` and returns what the attacker learned. `recover_input`
is the attacker's best effort: it holds the target's masked input, and every secret (self-mask seed,
mask key) for which it collected at least t shares; it unmasks the target alone when it can.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from worldlm_secure.errors import SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg import prg, shamir
from worldlm_secure.secagg.masking import (
    MaskingMember,
    MaskingParams,
    RoundConfig,
    mask_sign,
    pairwise_seed,
    share_aad,
    share_key,
    view_statement,
    x25519_public_bytes,
)
from worldlm_secure.secagg.masking_messages import (
    AggregatorMessage,
    EncryptedShare,
    KeyAdvert,
    MaskedInput,
    NeighbourKeys,
    ShareDelivery,
    SurvivorList,
    UnmaskRequest,
)
from worldlm_secure.secagg.graph import neighbour_graph
from worldlm_secure.secagg.quantize import dequantize


@dataclass(frozen=True)
class Strategy:
    """What the malicious aggregator does in one round.

    ``deliver_to_target``: which of the target's incoming shares it passes on (None = all).
    ``views``: member -> the survivor list it is shown (members not named get ``default_view``).
    ``corrupted``: members colluding with the aggregator: they sign any view and hand over every share
    they hold (the bound the guarantee is stated for).
    """

    target: str
    deliver_to_target: frozenset[str] | None = None
    views: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    default_view: tuple[str, ...] | None = None
    corrupted: frozenset[str] = frozenset()
    hidden: frozenset[str] = frozenset()  # members whose key adverts it drops (a smaller U1: smaller graph and t)


@dataclass
class Loot:
    """What the attacker holds at the end of the round."""

    masked: dict[str, MaskedInput] = field(default_factory=dict)
    seed_shares: dict[str, dict[int, shamir.Share]] = field(default_factory=dict)
    key_shares: dict[str, dict[int, shamir.Share]] = field(default_factory=dict)
    refusals: dict[str, str] = field(default_factory=dict)
    target_partners: tuple[str, ...] = ()  # whose shares the target received (it masked with exactly them)


class Attack:
    def __init__(self, names: Sequence[str], *, min_cohort: int, round_id: int = 5, **params: object) -> None:
        self.names = tuple(names)
        self.aggregator = NodeIdentity.generate("federation")
        self.ids = {n: NodeIdentity.generate(n) for n in self.names}
        self.cfg = RoundConfig.build(
            MaskingParams(clip_range=1.0, **params),  # type: ignore[arg-type]
            round_id, self.names, {n: i.public_bytes for n, i in self.ids.items()}, min_cohort,
            aggregator_key=self.aggregator.public_bytes,
        )
        # Every random byte string each member draws: a corrupted member hands its secrets to the attacker.
        self.drawn: dict[str, list[bytes]] = {n: [] for n in self.names}
        self.members = {n: MaskingMember(self.ids[n], self.cfg, entropy=self._entropy(n)) for n in self.names}
        self.vectors = {n: np.linspace(-0.9, 0.9, 8) * (i + 1) / len(self.names) for i, n in enumerate(self.names)}

    def sign(self, msg: AggregatorMessage) -> AggregatorMessage:
        return dataclasses.replace(msg, signature=self.aggregator.sign(msg.signed_payload()))

    def _entropy(self, member: str):  # os.urandom, recorded for ``member``
        def draw(n: int) -> bytes:
            out = os.urandom(n)
            self.drawn[member].append(out)
            return out

        return draw

    def _held(self, member: str, delivered: Sequence[EncryptedShare]) -> dict[str, tuple[shamir.Share, shamir.Share]]:
        """The (self-mask seed, mask key) shares ``member`` holds: those delivered to it, opened with its own
        transport key (the X25519 secret it drew whose public key it advertised)."""
        enc_public = self.adverts[member].enc_public
        enc = next(k for k in (X25519PrivateKey.from_private_bytes(d) for d in self.drawn[member] if len(d) == 32)
                   if x25519_public_bytes(k) == enc_public)
        rid, held = self.cfg.round_id, {}
        for e in delivered:
            key = share_key(enc, self.adverts[e.sender].enc_public, rid, e.sender, member, peer=e.sender)
            plain = AESGCM(key).decrypt(e.nonce, e.ciphertext, share_aad(rid, e.sender, member))
            held[e.sender] = (shamir.Share.from_bytes(plain[: shamir.SHARE_BYTES]), shamir.Share.from_bytes(plain[shamir.SHARE_BYTES :]))
        return held

    def _try(self, loot: Loot, member: str, fn):  # a member that refuses is out of the round
        try:
            return fn()
        except SecAggError as exc:
            loot.refusals[member] = str(exc)
            return None

    def run(self, s: Strategy) -> Loot:
        cfg, loot = self.cfg, Loot()
        adverts: dict[str, KeyAdvert] = {n: m.advertise() for n, m in self.members.items()}
        self.adverts = adverts
        advertised = tuple(sorted(set(adverts) - s.hidden))
        self.t = cfg.threshold_for(len(advertised))
        graph = neighbour_graph(advertised, cfg.neighbours, cfg.round_id)
        self.graph = graph
        shares: dict[str, list] = {n: [] for n in self.names}
        delivered: dict[str, tuple[EncryptedShare, ...]] = {}
        for n, m in self.members.items():
            if n not in advertised:
                continue
            keys = self.sign(NeighbourKeys(cfg.round_id, n, advertised, tuple(adverts[v] for v in sorted(graph[n]))))
            out = self._try(loot, n, lambda m=m, keys=keys: m.share_keys(keys))
            for enc in out.shares if out else ():
                shares[enc.recipient].append(enc)
        for n, m in self.members.items():
            if n in loot.refusals or n not in advertised:
                continue
            got = shares[n]
            if n == s.target and s.deliver_to_target is not None:
                got = [e for e in got if e.sender in s.deliver_to_target]
            if n == s.target:
                loot.target_partners = tuple(sorted(e.sender for e in got))
            delivered[n] = tuple(got)
            delivery = self.sign(ShareDelivery(cfg.round_id, n, delivered[n]))
            masked = self._try(loot, n, lambda m=m, d=delivery: m.masked_input(d, self.vectors[n]))
            if masked is not None:
                loot.masked[n] = masked
        everyone = tuple(sorted(loot.masked))
        views = {n: tuple(sorted(s.views.get(n, s.default_view or everyone))) for n in loot.masked}
        signatures: dict[tuple[str, ...], list[tuple[str, bytes]]] = {}
        for n in loot.masked:
            if n in s.corrupted:
                continue
            sig = self._try(loot, n, lambda n=n: self.members[n].confirm(self.sign(SurvivorList(cfg.round_id, n, views[n]))))
            if sig is not None:
                signatures.setdefault(views[n], []).append((n, sig.signature))
        for view in set(views.values()):  # corrupted members sign every view the attacker uses
            for c in s.corrupted:
                statement = view_statement(cfg, advertised, view)
                signatures.setdefault(view, []).append((c, self.ids[c].sign(statement)))
        for n in loot.masked:
            if n in s.corrupted or n in loot.refusals:
                continue
            request = self.sign(UnmaskRequest(cfg.round_id, n, views[n], tuple(sorted(signatures.get(views[n], [])))))
            response = self._try(loot, n, lambda n=n, r=request: self.members[n].unmask(r))
            for owner, raw in response.self_mask_shares if response else ():
                sh = shamir.Share.from_bytes(raw)
                loot.seed_shares.setdefault(owner, {})[sh.x] = sh
            for owner, raw in response.mask_key_shares if response else ():
                sh = shamir.Share.from_bytes(raw)
                loot.key_shares.setdefault(owner, {})[sh.x] = sh
        for c in s.corrupted:  # a corrupted member hands over every share it holds, of both kinds
            for owner, (seed, key) in self._held(c, delivered.get(c, ())).items():
                loot.seed_shares.setdefault(owner, {})[seed.x] = seed
                loot.key_shares.setdefault(owner, {})[key.x] = key
        return loot

    def _secret(self, store: Mapping[str, Mapping[int, shamir.Share]], owner: str) -> bytes | None:
        got = list(store.get(owner, {}).values())
        if len(got) < self.t:
            return None
        try:
            return shamir.combine(got, self.t)
        except SecAggError:
            return None

    def recover_input(self, loot: Loot, target: str) -> np.ndarray | None:
        """The target's input, if what the attacker holds unmasks it alone; else None."""
        if target not in loot.masked:
            return None
        seed = self._secret(loot.seed_shares, target)
        if seed is None:
            return None
        words = loot.masked[target].words().copy()
        masks: list[tuple[bytes, int]] = [(seed, -1)]
        adverts = self.adverts
        own_key = self._secret(loot.key_shares, target)
        for v in loot.target_partners:
            if own_key is not None:
                pairwise = pairwise_seed(X25519PrivateKey.from_private_bytes(own_key), adverts[v].mask_public, self.cfg.round_id, target, v)
            else:
                their = self._secret(loot.key_shares, v)
                if their is None:
                    return None
                pairwise = pairwise_seed(X25519PrivateKey.from_private_bytes(their), adverts[target].mask_public, self.cfg.round_id, v, target)
            masks.append((pairwise, -mask_sign(target, v)))
        prg.apply_masks(words, masks)
        return dequantize(words[:-1], self.cfg.quant)

    def leaks(self, loot: Loot, target: str) -> bool:
        got = self.recover_input(loot, target)
        return got is not None and bool(np.allclose(got, self.vectors[target], atol=self.cfg.quant.sum_error_bound(1)))


def random_names(n: int) -> tuple[str, ...]:
    return tuple(f"s{i:02d}-{os.urandom(2).hex()}" for i in range(n))
