"""Record-level DP inside a site: one DP-SGD local round on the engine's shared module.

`record_dp_params` fixes a site's DP-SGD parameters from its effective policy before it trains
(z derived ONCE from the record budget when the policy says `auto`), `site_record_dp` with the
engine's batch and step plan; `PrivateTrainer.train_round`
is `LocalTrainer.train_round` with the three DP-SGD changes:
- Poisson sampling: each of the site's N sequences (= records) joins a step's batch independently
  with probability q = batch_size·grad_accum / N, drawn from SecureRandom (the batch composition is
  what the subsampling amplification hides, so it must be unpredictable). The plain loop's
  fixed-size `torch.randint` batches would be wrong here: the accountant's bound is for Poisson
  subsampling at rate q, and sampling with replacement at a fixed size is a different mechanism
  whose ε that bound does not cover.
- per-sample clipping of each sequence's gradient to `max_grad_norm` (Opacus' GradSampleModule +
  DPOptimizer) instead of the plain loop's global clip;
- Gaussian noise of std z·max_grad_norm from SecureRandom on the summed clipped gradients, divided by
  the expected batch q·N (an empty batch still takes a noise-only step, as the analysis assumes).
The optimizer (AdamW, post-processing of the noisy gradient) and its state stay the site's own.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from worldlm_secure.errors import PolicyError
from worldlm_secure.privacy.accountant import derive_noise_multiplier
from worldlm_secure.privacy.record import PerSampleModel, secure_dp_optimizer, wrap_per_sample
from worldlm_secure.privacy.record_stream import RecordDPParams
from worldlm_secure.privacy.secure_random import SecureRandom
from worldlm_secure.train.device import autocast_for
from worldlm_secure.train.loop import LocalTrainer, TrainConfig, lr_at

if TYPE_CHECKING:
    from worldlm_secure.policy.compose import EffectivePolicy


def record_dp_params(eff: Any, *, records: int, expected_batch: int, planned_steps: int) -> RecordDPParams:
    """DP-SGD parameters of a site whose effective policy ``eff`` is record-level.

    ``records``: training sequences N; ``expected_batch``: q·N; ``planned_steps``: rounds × local_steps.
    Raises PolicyError naming the policy file and field when δ or the budget is missing, or when
    ``noise_multiplier: auto`` cannot meet the budget over the planned steps (refuse to start).
    """
    dp, rec = eff.differential_privacy, eff.differential_privacy.record
    where = eff.sources.get("differential_privacy.record") or (eff.files[0] if eff.files else "<policy>")
    if records < 1:
        raise PolicyError(f"{where} differential_privacy.record: the site has no training sequences to sample from")
    if dp.delta is None:
        raise PolicyError(f"{where} differential_privacy.delta: record-level DP needs δ (e.g. 1.0e-5)")
    budget = rec.epsilon_budget if rec.epsilon_budget is not None else dp.epsilon_budget
    if budget is None:
        raise PolicyError(
            f"{where} differential_privacy.record.epsilon_budget: record-level DP needs a budget "
            "(set record.epsilon_budget or differential_privacy.epsilon_budget)"
        )
    q = min(1.0, expected_batch / records)
    z = rec.noise_multiplier
    if z == "auto":
        try:
            z = derive_noise_multiplier(float(budget), float(dp.delta), q, planned_steps, dp.accountant)
        except PolicyError as exc:
            raise PolicyError(
                f"{where} differential_privacy.record.epsilon_budget: ε={budget:g} at δ={dp.delta:g} cannot be met "
                f"by {planned_steps} DP-SGD steps at sample rate {q:.4g} ({exc}); raise the budget, plan fewer "
                "rounds or local_steps, or use more data per site"
            ) from None
    return RecordDPParams(float(z), float(rec.max_grad_norm), q, max(1, round(q * records)), float(dp.delta),
                          float(budget), str(dp.accountant))


def site_record_dp(eff: EffectivePolicy, *, records: int, cfg: TrainConfig, rounds: int) -> RecordDPParams | None:
    """A site's DP-SGD parameters when ``eff`` (its policy composed up to the root) is record-level, else None.

    ``records``: the site's training sequences N; the expected batch q·N is ``batch_size·grad_accum`` and
    the steps are planned over ``rounds × local_steps``. The one plan the engine, a site node and the
    `--dry-run` plan use (raises PolicyError as `record_dp_params`).
    """
    if not eff.differential_privacy.record_level:
        return None
    return record_dp_params(eff, records=records, expected_batch=cfg.batch_size * cfg.grad_accum,
                            planned_steps=rounds * cfg.local_steps)


class PrivateTrainer:
    """DP-SGD rounds on ``trainer``'s module, wrapped once for per-sample gradients.

    Raises UnsupportedModelError at construction when Opacus cannot handle the model: the engine
    then refuses the run instead of training without DP.
    """

    def __init__(self, trainer: LocalTrainer, *, probe_batch: Mapping[str, torch.Tensor] | None = None) -> None:
        self.trainer = trainer
        self.wrapped: PerSampleModel = wrap_per_sample(trainer.model, probe_batch=probe_batch)
        self._rng = SecureRandom()

    @property
    def position_ids_fix(self) -> bool:
        return self.wrapped.position_ids_fix

    def train_round(
        self, sequences: torch.Tensor, optimizer: torch.optim.Optimizer, start_step: int, params: RecordDPParams
    ) -> tuple[float, int]:
        """``local_steps`` DP-SGD steps; returns (mean loss in nats over non-empty batches, steps taken)."""
        cfg, device, gsm = self.trainer.cfg, self.trainer.device, self.wrapped.gsm
        dp_opt = secure_dp_optimizer(
            optimizer, noise_multiplier=params.noise_multiplier, max_grad_norm=params.max_grad_norm,
            expected_batch_size=params.expected_batch,
        )
        n = int(sequences.shape[0])
        losses: list[float] = []
        gsm.train()
        self.wrapped.hooks_on()
        try:
            for i in range(cfg.local_steps):
                for group in dp_opt.param_groups:
                    group["lr"] = lr_at(cfg, start_step + i, self.trainer.total_steps)
                dp_opt.zero_grad(set_to_none=True)
                idx = np.flatnonzero(self._rng.uniform(n) < params.sample_rate)
                if idx.size == 0:
                    # Noise-only step: zero per-sample gradients of an empty batch (what Opacus' Poisson
                    # loader does); skipping the step would reveal that no record was sampled.
                    for p in dp_opt.params:
                        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
                else:
                    batch = sequences[torch.from_numpy(idx)].to(device, non_blocking=True)
                    with autocast_for(device):
                        loss = gsm(input_ids=batch, labels=batch).loss
                    with warnings.catch_warnings():
                        # Opacus' backward hooks fire on outputs because token ids need no gradient: expected.
                        warnings.filterwarnings("ignore", message="Full backward hook is firing")
                        loss.backward()
                    losses.append(loss.item())
                dp_opt.step()
        finally:
            dp_opt.zero_grad(set_to_none=True)  # no per-sample gradient outlives the site's round
            self.wrapped.hooks_off()
        return (float(np.mean(losses)) if losses else math.nan), cfg.local_steps
