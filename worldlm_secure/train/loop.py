"""The local training loop a site runs each round: plain torch, AdamW, cosine or constant LR.

Read top to bottom: `TrainConfig` says what to do, `LocalTrainer.train_round` does it, `evaluate`
measures validation perplexity. Optimizer state stays on the site between rounds (it never leaves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from worldlm_secure.train.device import autocast_for


@dataclass(frozen=True)
class TrainConfig:
    """Local optimisation per round. ``lr`` is the peak learning rate."""

    local_steps: int = 8
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0


def lr_at(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """Learning rate at global ``step`` (0-based) of ``total_steps``: linear warm-up, then cosine or flat."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))


def as_sequences(tokens: np.ndarray, seq_len: int) -> torch.Tensor:
    """Token ids reshaped to (n_seq, seq_len) int64; the tail that does not fill a sequence is dropped."""
    n = (tokens.size // seq_len) * seq_len
    return torch.from_numpy(np.ascontiguousarray(tokens[:n])).view(-1, seq_len)


class LocalTrainer:
    """Trains one shared ``model`` module on one site's data at a time (the caller loads the site's weights)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, device: torch.device, total_steps: int) -> None:
        self.model = model.to(device)
        self.cfg = cfg
        self.device = device
        self.total_steps = total_steps

    def make_optimizer(self) -> torch.optim.Optimizer:
        # Trainable tensors only: with adapters (model.adapters) the frozen base weights are not optimized.
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.cfg.lr,
            betas=(0.9, 0.95),
            foreach=True,
        )

    def train_round(
        self, sequences: torch.Tensor, optimizer: torch.optim.Optimizer, start_step: int, generator: torch.Generator
    ) -> float:
        """Run ``local_steps`` optimizer steps on random batches of ``sequences``; returns the mean loss (nats)."""
        self.model.train()
        losses: list[float] = []
        for i in range(self.cfg.local_steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(self.cfg, start_step + i, self.total_steps)
            optimizer.zero_grad(set_to_none=True)
            for _ in range(self.cfg.grad_accum):
                idx = torch.randint(0, sequences.shape[0], (self.cfg.batch_size,), generator=generator)
                batch = sequences[idx].to(self.device, non_blocking=True)
                with autocast_for(self.device):
                    loss = self.model(input_ids=batch, labels=batch).loss / self.cfg.grad_accum
                loss.backward()
                losses.append(loss.item() * self.cfg.grad_accum)
            if self.cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                               self.cfg.max_grad_norm)
            optimizer.step()
        return float(np.mean(losses)) if losses else float("nan")

    @torch.no_grad()
    def evaluate(self, sequences: torch.Tensor, batch_size: int = 64) -> float:
        """Validation perplexity: exp of the mean next-token cross-entropy over all predicted positions."""
        self.model.eval()
        total, count = 0.0, 0
        for start in range(0, sequences.shape[0], batch_size):
            batch = sequences[start : start + batch_size].to(self.device)
            with autocast_for(self.device):
                logits = self.model(input_ids=batch).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += batch[:, 1:].numel()
        return math.exp(total / max(1, count))
