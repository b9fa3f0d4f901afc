"""One site as a long-lived Ray actor: it holds its model, optimizer state and keys, and releases only
what would cross the network.

The actor trains, evaluates, and for every release computes its own update on site: the weights (FedAtt
attention on its own parameters, or examples / n_max), w * (params - last broadcast), clipped to the
round's DP norm, encoded (`DeltaCodec`). It then runs its side of the round's protocol:

  masking: the one member session (`secagg.masking_round.MaskingSession`) with the site's own
           `NodeIdentity`, serialized protocol messages in and out (bytes); the distributed DP share is
           added inside the masked input;
  ckks:    the one member session (`secagg.ckks_round.CkksSession`) over the site's own keys: it encrypts
           and signs its contribution under the epoch's verified public context; a key holder also makes
           its X25519 transport key, generates the epoch's keys when it is the generator, unwraps its
           sealed secret key and decrypts the sum;
  none:    the encoded vector itself (a plain sum: what the network would carry under that policy).

What comes back to the driver is: losses, seconds, perplexities, serialized protocol messages (bytes),
and plain vectors only under protocol `none`. Parameters go down (the aggregates' broadcast), never up.

The member-side computation (weights, deltas, clip, encode) is `aggregation.member`'s and the local round
is `train.site`'s: the same the in-process engine and a site node (`node.site`) use.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from worldlm_secure.aggregation.member import encode_update, member_weights
from worldlm_secure.aggregation.weighted import DeltaCodec
from worldlm_secure.errors import SecAggError
from worldlm_secure.identity import NodeIdentity
from worldlm_secure.train.site import SiteState

if TYPE_CHECKING:
    from worldlm_secure.privacy.record_stream import RecordDPParams
    from worldlm_secure.train.private import PrivateTrainer

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ReleaseSpec:
    """What a site needs to compute its own update for one release (all public to the federation).

    ``weighting``: "attention" (FedAtt weights, computed on site) or "examples" (examples / ``n_max``);
    ``clip``: the round's user-level DP clipping norm (L2, over the whole group; None: no DP).
    """

    names: tuple[str, ...]
    weighting: str
    n_max: float
    attention: Any  # aggregation.AttentionConfig
    clip: float | None


def member_vector(params: Mapping[str, torch.Tensor], server: Mapping[str, torch.Tensor], examples: int,
                  spec: ReleaseSpec) -> np.ndarray:
    """A site's encoded release: weights, w * (params - server) per tensor, clipped, as one float64 vector."""
    names = list(spec.names)
    weights = member_weights(server, params, names, spec.weighting, examples=examples, n_max=spec.n_max,
                             attention=spec.attention)
    deltas = {n: params[n] - server[n] for n in names}
    return encode_update(DeltaCodec.for_tensors(server, names), deltas, weights, spec.clip)


class SiteMember:
    """A site's member side of its releases, without a model: one prepared vector at a time and at most one
    protocol session over it (`masking`, `ckks`), under the site's own `NodeIdentity`. `SiteActor` is this
    plus the model, data and training that compute the vector."""

    def __init__(self, name: str, identity: NodeIdentity) -> None:
        self.name = name
        self.identity = identity
        self._vector: np.ndarray | None = None
        self._session: Any = None  # secagg.masking_round.MaskingSession of the round in progress
        self._ckks: Any = None  # secagg.ckks_round.CkksKeyring: this site's CKKS keys across a key epoch
        self._ckks_session: Any = None  # secagg.ckks_round.CkksSession of the round in progress
        self._opened = False  # whether a protocol session was opened over the prepared release

    def public_key(self) -> bytes:
        """The raw Ed25519 public key that signs this site's key adverts."""
        return self.identity.public_bytes

    def prepare_vector(self, vector: np.ndarray) -> int:
        """Keep ``vector`` (float64, encoded) as this release's update, taken once by `plain` or the next protocol
        session; returns its length (public: the codec's). Any session of the previous release is dropped."""
        self._vector = vector
        self._session = self._ckks_session = None
        self._opened = False  # one protocol session per prepared release (see `_open`)
        return int(vector.size)

    def _open(self) -> None:
        """A protocol session may open once per prepared release: a second opening would start a fresh session
        over the same release, resetting its once-per-round guards (a holder's one decryption)."""
        if self._opened:
            raise SecAggError(f"{self.name}: a second protocol round over the same prepared release; refused")
        self._opened = True

    def plain(self) -> np.ndarray:
        """The encoded vector itself: only for protocol none, which sends it as is."""
        return self._take()

    def _take(self) -> np.ndarray:
        if self._vector is None:
            raise SecAggError(f"{self.name}: no prepared release")
        v, self._vector = self._vector, None  # one release, one use
        return v

    # ---- masking (SecAgg+): the one member session, bytes in, bytes out ----
    def masking(self, data: bytes, config: Any = None, noise: Any = None) -> bytes:
        """One SecAgg+ request in, this site's answer out (`secagg.masking_round.MaskingSession`). The round's
        first request is empty and carries its public `RoundConfig` and the distributed DP ``noise`` (or None);
        the prepared release is taken (once) when the masked input is due."""
        from worldlm_secure.secagg.masking import MaskingMember
        from worldlm_secure.secagg.masking_round import MaskingSession

        if not data:
            self._open()
            self._session = MaskingSession(MaskingMember(self.identity, config, noise=noise), self._take)
        if self._session is None:
            raise SecAggError(f"{self.name}: a SecAgg+ request outside a round; refused")
        return self._session.handle(data)

    # ---- CKKS: the one member session (key holder included), bytes in, bytes out ----
    def ckks(self, data: bytes, setup: Any = None) -> bytes:
        """One CKKS request in, this site's answer out (`secagg.ckks_round.CkksSession` over the site's own
        `CkksKeyring`, kept across the rounds of a key epoch). The first request of a round carries the
        round's `CkksRoundSetup` (on Ray the driver hands over the named holders and the sites' keys, so the
        checks guard against faults, not a malicious driver); the prepared release is taken (once) when the
        contribution is due."""
        from worldlm_secure.secagg.ckks_round import CkksKeyring, CkksSession

        if setup is not None:
            self._open()
            if self._ckks is None:
                self._ckks = CkksKeyring(self.identity)
            self._ckks_session = CkksSession(self._ckks, setup, self._take)
        if self._ckks_session is None:
            raise SecAggError(f"{self.name}: a CKKS request outside a round; refused")
        return self._ckks_session.handle(data)


class SiteActor(SiteMember):
    """A site's state and member side (the body of its Ray actor); see the module docstring."""

    def __init__(self, name: str, config: tuple, init: Tensors, train: torch.Tensor, val: torch.Tensor,
                 generator_state: torch.Tensor) -> None:
        """``config`` = (model spec, train config, total steps, device, threads, seed), as `RayEngine` builds it.

        The site's Ed25519 identity for secure aggregation is generated here and never leaves the actor
        (`NodeIdentity` does not serialize its key); the driver learns its public key (`public_key`).
        """
        from worldlm_secure.model import build_model
        from worldlm_secure.train import LocalTrainer, pick_device, set_threads

        spec, cfg, total_steps, device, threads, seed = config
        set_threads(threads)
        super().__init__(name, NodeIdentity.generate(name))
        model = build_model(spec, seed=seed)  # weights are replaced by `init` and the broadcasts
        self.trainer = LocalTrainer(model, cfg, pick_device(device), total_steps)
        generator = torch.Generator()
        generator.set_state(generator_state)
        # Weights, data, generator and optimizer state: the one site runner's (`train.site`) state.
        self.site = SiteState(name, {n: t.clone() for n, t in init.items()}, train, val, generator)
        self.server = {n: t.clone() for n, t in init.items()}  # the last broadcast: what deltas are taken from
        self._private: PrivateTrainer | None = None  # made on the first record-level DP round

    # ---- training and evaluation ----
    def train(self, start_step: int, record: RecordDPParams | None = None) -> tuple[float, float, int]:
        """One local round from ``start_step``; returns (mean loss, seconds spent in this actor, DP-SGD steps).

        ``record``: the site's `RecordDPParams` when its policy asks for record-level DP (Opacus DP-SGD,
        Poisson sampling and noise from the CSPRNG, in this actor); None: plain training (0 DP-SGD steps).
        """
        t0 = time.perf_counter()
        if record is not None and self._private is None:
            from worldlm_secure.train.private import PrivateTrainer

            self._private = PrivateTrainer(self.trainer)  # wraps the module once for per-sample gradients
        loss, taken = self.site.train_round(self.trainer, start_step, private=self._private, record=record)
        return loss, time.perf_counter() - t0, taken

    def receive(self, tensors: Tensors) -> None:
        """The federation's broadcast (aggregated key and shared layers): becomes the site's and the new base."""
        for n, t in tensors.items():
            self.site.params[n] = t.clone()
            self.server[n] = t.clone()

    def evaluate(self) -> float:
        """Validation perplexity of the site's current model (only this number leaves)."""
        return self.site.evaluate(self.trainer)

    # ---- one release ----
    def prepare(self, spec: ReleaseSpec) -> int:
        """Compute and keep this release's encoded vector (`prepare_vector`); returns its length."""
        return self.prepare_vector(member_vector(self.site.params, self.server, self.site.examples, spec))
