"""The embedded synthetic world corpus: token streams from per-site Markov chains.

Federations speak different "dialects" of one language:
- a **common core**: transitions shared by everyone (weight ``1 - fed_weight``);
- a **federation part**: transitions, and a block of federation-only tokens, that differ strongly
  between federations (weight ``fed_weight``);
- a **site part**: a mild per-site perturbation (weight ``site_weight``).

Each site's chain is order 1, so its entropy rate is exact:
``H = -sum_i pi_i sum_j P_ij ln P_ij`` nats/token (pi the stationary distribution), and
``exp(H)`` is the perplexity floor no model can beat on that site's stream. Every sequence starts
from pi, so the floor holds for every predicted position.

The corpus is public test data, not a secret: it uses numpy's seeded generator for reproducibility.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SyntheticSpec:
    """Shape of the synthetic world. Token counts are per site."""

    vocab_size: int = 512
    own_tokens: int = 64  # tokens used by only one federation (distinct vocabularies)
    successors: int = 12  # non-zero successors per token in each component
    fed_weight: float = 0.75  # how strongly federations differ (0 = identical)
    site_weight: float = 0.1  # how strongly sites of one federation differ
    train_tokens: int = 24_576
    val_tokens: int = 8_192
    seed: int = 0


@dataclass(frozen=True)
class SiteStream:
    """One site's data: train and validation token ids (int64) and its exact entropy rate."""

    site: str
    train: np.ndarray
    val: np.ndarray
    entropy_rate_nats: float

    @property
    def perplexity_floor(self) -> float:
        return float(np.exp(self.entropy_rate_nats))


def _sparse_rows(rng: np.random.Generator, n_rows: int, support: np.ndarray, k: int) -> np.ndarray:
    """``n_rows`` distributions over ``support``, each on ``k`` random tokens with Dirichlet(1) weights."""
    rows = np.zeros((n_rows, int(support.max()) + 1 if support.size else 0))
    for i in range(n_rows):
        idx = rng.choice(support, size=min(k, support.size), replace=False)
        rows[i, idx] = rng.dirichlet(np.ones(idx.size))
    return rows


def _pad(rows: np.ndarray, width: int) -> np.ndarray:
    out = np.zeros((rows.shape[0], width))
    out[:, : rows.shape[1]] = rows
    return out


def stationary(P: np.ndarray, tol: float = 1e-13, max_iter: int = 100_000) -> np.ndarray:
    """The stationary distribution of row-stochastic ``P`` (power iteration from uniform)."""
    pi = np.full(P.shape[0], 1.0 / P.shape[0])
    for _ in range(max_iter):
        nxt = pi @ P
        if np.abs(nxt - pi).sum() < tol:
            return nxt
        pi = nxt
    return pi


def entropy_rate(P: np.ndarray) -> float:
    """Entropy rate (nats/token) of the order-1 chain ``P`` started in its stationary distribution."""
    pi = stationary(P)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(P > 0, P * np.log(P), 0.0)
    return float(-(pi * plogp.sum(axis=1)).sum())


def site_chains(spec: SyntheticSpec, federations: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Transition matrices (V x V) for every site, keyed by site name.

    Tokens [0, V - F*own) are the shared vocabulary; each federation owns a block of ``own_tokens``.
    """
    V, F = spec.vocab_size, len(federations)
    n_shared = V - F * spec.own_tokens
    if n_shared < spec.successors:
        raise ValueError(f"data.synthetic: vocab_size {V} too small for {F} federations x {spec.own_tokens} own tokens")
    rng = np.random.default_rng(spec.seed)
    shared = np.arange(n_shared)
    core = _pad(_sparse_rows(rng, V, shared, spec.successors), V)
    chains: dict[str, np.ndarray] = {}
    for f_idx, (fed, sites) in enumerate(sorted(federations.items())):
        own = np.arange(n_shared + f_idx * spec.own_tokens, n_shared + (f_idx + 1) * spec.own_tokens)
        vocab = np.concatenate([shared, own])
        fed_part = _pad(_sparse_rows(rng, V, vocab, spec.successors), V)
        for site in sorted(sites):
            site_part = _pad(_sparse_rows(rng, V, vocab, spec.successors), V)
            P = (1 - spec.fed_weight) * core + spec.fed_weight * fed_part
            P = (1 - spec.site_weight) * P + spec.site_weight * site_part
            chains[site] = P / P.sum(axis=1, keepdims=True)
    return chains


def sample_chain(P: np.ndarray, n_tokens: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    """``n_tokens`` ids as independent sequences of ``seq_len``, each started from the stationary law."""
    n_seq = max(1, n_tokens // seq_len)
    cdf = np.cumsum(P, axis=1)
    cdf[:, -1] = 1.0
    pi_cdf = np.cumsum(stationary(P))
    pi_cdf[-1] = 1.0
    out = np.empty((n_seq, seq_len), dtype=np.int64)
    out[:, 0] = np.searchsorted(pi_cdf, rng.random(n_seq), side="right")
    for t in range(1, seq_len):
        u = rng.random(n_seq)
        rows = cdf[out[:, t - 1]]
        out[:, t] = (rows < u[:, None]).sum(axis=1)
    return out.reshape(-1)


def make_world_corpus(spec: SyntheticSpec, federations: dict[str, list[str]], seq_len: int) -> dict[str, SiteStream]:
    """Train/validation streams for every site of ``federations`` (federation -> its sites)."""
    chains = site_chains(spec, federations)
    streams: dict[str, SiteStream] = {}
    for i, (site, P) in enumerate(sorted(chains.items())):
        rng = np.random.default_rng([spec.seed, 1 + i])
        streams[site] = SiteStream(
            site=site,
            train=sample_chain(P, spec.train_tokens, seq_len, rng),
            val=sample_chain(P, spec.val_tokens, seq_len, rng),
            entropy_rate_nats=entropy_rate(P),
        )
    return streams
