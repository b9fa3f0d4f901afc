"""The synthetic world corpus: exact entropy rate, federation structure, determinism."""

from __future__ import annotations

import numpy as np

from worldlm_secure.data.synthetic import SyntheticSpec, entropy_rate, make_world_corpus, sample_chain, site_chains

FEDS = {"a": ["a1", "a2"], "b": ["b1", "b2"]}
SPEC = SyntheticSpec(vocab_size=64, own_tokens=8, successors=4, train_tokens=4096, val_tokens=1024)


def test_entropy_rate_of_a_known_chain() -> None:
    P = np.array([[0.5, 0.5], [1.0, 0.0]])  # stationary (2/3, 1/3); H = 2/3 ln 2
    assert abs(entropy_rate(P) - (2 / 3) * np.log(2)) < 1e-9


def test_empirical_bigram_entropy_approaches_the_exact_rate() -> None:
    P = site_chains(SPEC, FEDS)["a1"]
    ids = sample_chain(P, 200_000, 200, np.random.default_rng(1)).reshape(-1, 200)
    prev, nxt = ids[:, :-1].ravel(), ids[:, 1:].ravel()
    empirical = -np.mean(np.log(P[prev, nxt]))
    assert abs(empirical - entropy_rate(P)) < 0.02


def test_federations_have_their_own_tokens_and_sites_differ_mildly() -> None:
    chains = site_chains(SPEC, FEDS)
    own_a = slice(64 - 16, 64 - 8)  # federation a's block
    assert chains["a1"][:, own_a].sum() > 0 and chains["b1"][:, own_a].sum() == 0
    within = np.abs(chains["a1"] - chains["a2"]).sum()
    across = np.abs(chains["a1"] - chains["b1"]).sum()
    assert within < across / 3


def test_corpus_is_deterministic() -> None:
    one = make_world_corpus(SPEC, FEDS, 32)
    two = make_world_corpus(SPEC, FEDS, 32)
    assert all(np.array_equal(one[s].train, two[s].train) for s in one)
    assert all(one[s].perplexity_floor > 1 for s in one)
