"""Record-level DP (DP-SGD via Opacus) on a tiny HF Llama; unsupported models are refused, never
trained without privacy; the noise does not come from torch's generator."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from worldlm_secure.errors import ConfigError
from worldlm_secure.privacy import epsilon
from worldlm_secure.privacy.record import UnsupportedModelError, make_private_training

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore")

LLAMA = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
)


def _loader(n: int = 16, batch: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)  # data only (not secret)
    return DataLoader(TensorDataset(torch.randint(0, 64, (n, 12), generator=g)), batch_size=batch)


def _train(pt, epochs: int = 1) -> int:  # type: ignore[no-untyped-def]
    taken = 0
    for _ in range(epochs):
        for (x,) in pt.data_loader:
            if len(x) == 0:  # an empty Poisson draw (p ≈ 1% per batch here): no step
                continue
            pt.optimizer.zero_grad()
            pt.model(input_ids=x, labels=x).loss.backward()
            pt.optimizer.step()
            taken += 1
    return taken


def test_tiny_llama_trains_with_dp_sgd_and_accounts_every_step() -> None:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pt = make_private_training(model, torch.optim.SGD(model.parameters(), lr=0.05), _loader(),
                               noise_multiplier=1.0, max_grad_norm=1.0)
    assert not pt.position_ids_fix and pt.sample_rate == pytest.approx(0.25)
    taken = _train(pt)
    assert pt.steps == taken >= 1
    assert pt.take_uncharged_steps() == taken and pt.take_uncharged_steps() == 0
    assert pt.epsilon(1e-5) == pytest.approx(epsilon(1.0, 0.25, taken, 1e-5, "rdp"), rel=1e-9)
    after = pt.unwrap().state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_noise_is_not_from_torchs_generator() -> None:
    grads = []
    for _ in range(2):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
        model.load_state_dict(REF.state_dict())
        loader = DataLoader(TensorDataset(torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(1))),
                            batch_size=4)
        pt = make_private_training(model, torch.optim.SGD(model.parameters(), lr=0.0), loader,
                                   noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
        torch.manual_seed(1234)  # an attacker who knows torch's seed must not learn the noise
        (x,) = next(iter(pt.data_loader))
        pt.optimizer.zero_grad()
        pt.model(input_ids=x, labels=x).loss.backward()
        pt.optimizer.step()
        grads.append(next(p.grad.clone() for p in pt.unwrap().parameters()))
    assert not torch.allclose(grads[0], grads[1])
    assert grads[0].std() > 0.1  # noise of std z·C/B = 0.25 is there


REF = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))


def test_gpt2_is_made_private_with_the_documented_position_ids_fix() -> None:
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg)
    pt = make_private_training(model, torch.optim.SGD(model.parameters(), lr=0.05), _loader(8),
                               noise_multiplier=1.0, max_grad_norm=1.0)
    assert pt.position_ids_fix
    _train(pt)
    assert pt.steps == 2


class _Out(types.SimpleNamespace):
    loss: torch.Tensor


class BroadcastsAPositionTable(nn.Module):
    """Like GPT-2's failure, with no `position_ids` argument to fix it: per-sample grads impossible."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(64, 8)
        self.pos = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 64)
        self.config = types.SimpleNamespace(vocab_size=64)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> _Out:
        h = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1]).unsqueeze(0))
        logits = self.head(h)
        return _Out(loss=nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()))


def test_models_opacus_cannot_handle_are_refused_with_a_clear_error() -> None:
    m = BroadcastsAPositionTable()
    with pytest.raises(UnsupportedModelError, match="per-sample gradients for BroadcastsAPositionTable"):
        make_private_training(m, torch.optim.SGD(m.parameters(), lr=0.1), _loader(),
                              noise_multiplier=1.0, max_grad_norm=1.0)
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(UnsupportedModelError, match="Opacus cannot train privately"):
        make_private_training(bn, torch.optim.SGD(bn.parameters(), lr=0.1), _loader(),
                              noise_multiplier=1.0, max_grad_norm=1.0)
    plain = nn.Linear(4, 4)
    with pytest.raises(ConfigError, match="probe_batch"):
        make_private_training(plain, torch.optim.SGD(plain.parameters(), lr=0.1), _loader(),
                              noise_multiplier=1.0, max_grad_norm=1.0)


def test_auto_noise_multiplier_meets_the_budget_or_refuses() -> None:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    pt = make_private_training(model, torch.optim.SGD(model.parameters(), lr=0.05), _loader(),
                               noise_multiplier="auto", max_grad_norm=1.0,
                               target_epsilon=2.0, target_delta=1e-5, planned_steps=40)
    assert epsilon(pt.noise_multiplier, 0.25, 40, 1e-5) <= 2.0
    with pytest.raises(ConfigError, match="auto needs"):
        make_private_training(model, torch.optim.SGD(model.parameters(), lr=0.05), _loader(),
                              noise_multiplier="auto", max_grad_norm=1.0)
