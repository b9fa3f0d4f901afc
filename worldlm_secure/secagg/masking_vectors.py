"""Builds protocols/vectors/secagg-plus.json: fixed keys and seeds -> expected shares, masks, messages, aggregate.

Regenerate with ``python -m worldlm_secure.secagg.masking_vectors > protocols/vectors/secagg-plus.json``.
All randomness comes from `DeterministicEntropy`, which is for test vectors ONLY: a member's entropy is
the PRG keystream of its fixed 32-byte seed, consumed in the order the spec lists ("Entropy draws").
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from worldlm_secure.identity import NodeIdentity
from worldlm_secure.secagg import prg, shamir
from worldlm_secure.secagg.graph import neighbour_graph
from worldlm_secure.secagg.masking import (
    MaskingAggregator,
    MaskingMember,
    MaskingParams,
    RoundConfig,
    pairwise_seed,
    x25519_public_bytes,
)
from worldlm_secure.secagg.masking_round import drive_round
from worldlm_secure.secagg.protocol import DropoutPlan
from worldlm_secure.secagg.quantize import QuantizationSpec, quantize


class DeterministicEntropy:
    """Reproducible bytes: the PRG keystream of ``seed``. Test vectors only, never for a real round."""

    def __init__(self, seed: bytes) -> None:
        self._stream = prg.keystream(seed)

    def __call__(self, n: int) -> bytes:
        return self._stream.update(bytes(n))


def _seed(label: str) -> bytes:
    return hashlib.sha256(f"worldlm-secagg+/test-vector/{label}".encode()).digest()


def _words(a: np.ndarray) -> list[int]:
    return [int(v) for v in a]


def build_vectors() -> dict[str, Any]:
    out: dict[str, Any] = {
        "description": "SecAgg+ (masking) test vectors for worldlm-secure; spec: protocols/secagg-plus.md",
        "version": 1,
    }
    out["prg"] = [
        {"seed": _seed(f"prg-{i}").hex(), "words_u32": _words(prg.expand(_seed(f"prg-{i}"), 8))} for i in range(3)
    ]

    secret = _seed("shamir-secret")
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3, entropy=DeterministicEntropy(_seed("shamir-coefficients")))
    out["shamir"] = {
        "prime": "2^521-1",
        "secret": secret.hex(),
        "threshold": 3,
        "coefficient_entropy_seed": _seed("shamir-coefficients").hex(),
        "shares": [s.to_bytes().hex() for s in shares],
    }

    spec = QuantizationSpec(bits=16, clip_range=2.0, n_members=3)
    x = np.array([0.0, 1.0, -1.0, 0.123456, 1.999, -2.5, 3.0])
    q = quantize(x, spec, rounding_seed=_seed("rounding"))
    out["quantize"] = {
        "bits": 16,
        "clip_range": 2.0,
        "n_members": 3,
        "scale": spec.scale,
        "x": x.tolist(),
        "rounding_seed": _seed("rounding").hex(),
        "q_u32": _words(q.values),
        "clipped": q.clipped,
    }

    a = X25519PrivateKey.from_private_bytes(_seed("pair-a"))
    b = X25519PrivateKey.from_private_bytes(_seed("pair-b"))
    out["pairwise_seed"] = {
        "round_id": 5,
        "a": {"name": "alice", "mask_private": _seed("pair-a").hex()},
        "b": {"name": "bob", "mask_private": _seed("pair-b").hex()},
        "seed": pairwise_seed(a, x25519_public_bytes(b), 5, "alice", "bob").hex(),
    }
    out["round"] = _round_vector()
    return out


def _round_vector() -> dict[str, Any]:
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
    round_id = 7
    params = MaskingParams(clip_range=2.0, neighbours=6, threshold=0.51, bits=16)
    ids = {n: NodeIdentity(n, Ed25519PrivateKey.from_private_bytes(_seed(f"identity-{n}"))) for n in names}
    aggregator = NodeIdentity("aggregator", Ed25519PrivateKey.from_private_bytes(_seed("identity-aggregator")))
    cfg = RoundConfig.build(
        params, round_id, names, {n: i.public_bytes for n, i in ids.items()}, min_cohort=3,
        aggregator_key=aggregator.public_bytes,
    )
    members = {n: MaskingMember(ids[n], cfg, entropy=DeterministicEntropy(_seed(f"entropy-{n}"))) for n in names}
    vectors = {n: np.round(np.sin(np.arange(5) + 1.7 * i) * 1.5 + (2.0 if n == "carol" else 0.0), 6) for i, n in enumerate(names)}
    dropouts = DropoutPlan(after_keys=frozenset({"frank"}), after_input=frozenset({"erin"}))
    trace = drive_round(members, MaskingAggregator(cfg, aggregator), vectors, dropouts, record=True)
    graph = neighbour_graph(names, cfg.neighbours, round_id)
    held = {
        holder: {owner: {"self_mask": s.to_bytes().hex(), "mask_key": k.to_bytes().hex()} for owner, (s, k) in sorted(m._held.items())}
        for holder, m in members.items()
        if hasattr(m, "_held")
    }
    seeds = {
        f"{u}|{v}": pairwise_seed(members[u]._mask, x25519_public_bytes(members[v]._mask), round_id, u, v).hex()
        for u in names
        for v in sorted(graph[u])
        if u < v
    }
    return {
        "round_id": round_id,
        "params": {"neighbours": 6, "threshold": 0.51, "bits": 16, "clip_range": 2.0, "min_cohort": 3},
        "derived": {
            "k": cfg.neighbours,
            "t": cfg.threshold,
            "consistency_signatures": cfg.consistency_threshold(len(names)),
            "scale": cfg.quant.scale,
        },
        "identity_private_keys": {n: _seed(f"identity-{n}").hex() for n in names},
        "aggregator_private_key": _seed("identity-aggregator").hex(),
        "entropy_seeds": {n: _seed(f"entropy-{n}").hex() for n in names},
        "vectors": {n: v.tolist() for n, v in vectors.items()},
        "dropouts": {"before_keys": [], "after_keys": ["frank"], "after_input": ["erin"]},
        "expected": {
            "graph": {n: sorted(graph[n]) for n in names},
            "self_mask_seeds": {n: members[n]._self_seed.hex() for n in names},
            "self_mask_words_u32": {n: _words(prg.expand(members[n]._self_seed, 6)) for n in names},
            "pairwise_seeds": seeds,
            "held_shares": held,
            "messages": [{"from": who, "hex": data.hex()} for who, data in trace.wire],
            "contributors": list(trace.outcome.contributors),
            "aggregate": trace.outcome.total.tolist(),
            "clipped_fraction": trace.outcome.clipped_fraction,
        },
    }


if __name__ == "__main__":
    json.dump(build_vectors(), sys.stdout, indent=1)
    sys.stdout.write("\n")
