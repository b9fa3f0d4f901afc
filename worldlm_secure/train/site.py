"""One site's local round, written once: the in-process engine, a Ray site actor and a site node train with it.

`SiteState` is what a site keeps between rounds: its weights, its data as sequences, its batch generator
and its optimizer state (which never leaves the site). `SiteState.train_round` loads the site into a
shared `LocalTrainer` module, runs one local round (plain, or DP-SGD through a `PrivateTrainer` when the
site's policy is record-level) and keeps the trained weights and optimizer state; `SiteState.evaluate`
measures the site's validation perplexity. `site_generator` seeds a site's batch generator, the same in
every backend (that is what makes their per-site results equal).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from worldlm_secure.train.loop import LocalTrainer

if TYPE_CHECKING:
    from worldlm_secure.privacy.record_stream import RecordDPParams
    from worldlm_secure.train.private import PrivateTrainer


def site_generator(seed: int, index: int) -> torch.Generator:
    """The batch generator of the site at ``index`` (0-based, among all the world's sites sorted by name)
    for the run's ``seed``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


@dataclass
class SiteState:
    """One site's state between rounds.

    ``params``: every parameter by name (CPU tensors); ``train``, ``val``: token ids as (n_seq, seq_len)
    int64 sequences; ``generator``: draws the plain loop's batches; ``opt_state``: the optimizer's state
    dict after the last round (None before the first).
    """

    name: str
    params: dict[str, torch.Tensor]
    train: torch.Tensor
    val: torch.Tensor
    generator: torch.Generator
    opt_state: dict | None = None

    @property
    def examples(self) -> int:
        """Training sequences (= records under record-level DP)."""
        return int(self.train.shape[0])

    def train_round(self, trainer: LocalTrainer, start_step: int, *, private: PrivateTrainer | None = None,
                    record: RecordDPParams | None = None) -> tuple[float, int]:
        """One local round from global step ``start_step`` on ``trainer``'s module; returns (mean loss in nats,
        DP-SGD steps taken).

        ``record``: the site's DP-SGD parameters when its policy is record-level, trained by ``private`` (which
        wraps ``trainer``'s module); None: plain training on the site's generator (0 DP-SGD steps). The caller
        checks and charges the site's `RecordStream` (on Ray the driver holds it, not the site's actor).
        """
        if record is not None and (private is None or private.trainer is not trainer):
            raise ValueError(f"{self.name}: record-level DP needs a PrivateTrainer around this trainer")
        model = trainer.model
        model.load_state_dict(self.params, strict=False)
        # A fresh optimizer every round around the shared module; the site's own state makes it the site's.
        opt = trainer.make_optimizer()
        if self.opt_state is not None:
            opt.load_state_dict(self.opt_state)
        if record is not None:
            assert private is not None  # checked above
            loss, taken = private.train_round(self.train, opt, start_step, record)
        else:
            loss, taken = trainer.train_round(self.train, opt, start_step, self.generator), 0
        # CPU copies: the module is loaded with the next site's weights at once.
        self.params = {n: p.detach().to("cpu").clone() for n, p in model.named_parameters()}
        self.opt_state = opt.state_dict()
        return float(loss), int(taken)

    def evaluate(self, trainer: LocalTrainer) -> float:
        """Validation perplexity of the site's current weights, loaded into ``trainer``'s module."""
        trainer.model.load_state_dict(self.params, strict=False)
        return float(trainer.evaluate(self.val))
