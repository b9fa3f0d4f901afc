"""Sites as Ray tasks: every site of a world trains in its own Ray task, with its own CPUs (or GPU).

`RayEngine` is the in-process `Engine` with one step replaced: local training. Each round, each site
is one Ray task (``cpus_per_site`` / ``gpus_per_site`` reserved), so the sites of a round train in
parallel on as many cores as the cluster has and queue when there are more sites than cores. A task
trains the site's model from the parameters its federation sent down, with the site's optimizer state
and sampling generator, and returns the trained parameters and that state. The release path runs
unchanged in the driver (policy authorization, clipping, DP noise, masking / CKKS member and
aggregator sides, ledgers), and so does evaluation. Same seed, same initial model, same per-site
generators: results equal the in-process engine's (tests/test_ray_backend.py).

Not yet at its real boundary here: the member side of each protection (clip, quantize, mask or
encrypt, distributed noise) runs in the driver, not in the site's task, and trained parameters and
optimizer state cross Ray's object store in plaintext: a simulation harness trusted like the
in-process engine. Record-level DP-SGD (Opacus) is not distributed yet: such worlds are refused.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from worldlm_secure.errors import ConfigError
from worldlm_secure.federation.engine import Engine

_TRAINERS: dict[str, Any] = {}  # per worker process: one model + trainer per configuration, reused


def train_site(
    config: tuple, params: dict[str, torch.Tensor], opt_state: dict | None, generator_state: torch.Tensor,
    train: torch.Tensor, start_step: int,
) -> tuple[float, dict[str, torch.Tensor], dict, torch.Tensor, float]:
    """One site's local training round (the body of its Ray task).

    ``config`` = (model spec, train config, total steps, device, threads, seed). Returns (mean loss,
    trained parameters on CPU, optimizer state, generator state, seconds spent in this task).
    """
    t0 = time.perf_counter()
    key = repr(config)  # the dataclasses' repr is their content
    if key not in _TRAINERS:
        from worldlm_secure.model import build_model
        from worldlm_secure.train import LocalTrainer, pick_device, set_threads

        spec, cfg, total_steps, device, threads, seed = config
        set_threads(threads)
        model = build_model(spec, seed=seed)  # weights are replaced by the federation's every round
        _TRAINERS[key] = LocalTrainer(model, cfg, pick_device(device), total_steps)
    trainer = _TRAINERS[key]
    trainer.model.load_state_dict(params, strict=False)
    opt = trainer.make_optimizer()
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    gen = torch.Generator()
    gen.set_state(generator_state)
    loss = trainer.train_round(train, opt, start_step, gen)
    out = {n: p.detach().to("cpu").clone() for n, p in trainer.model.named_parameters()}
    return loss, out, opt.state_dict(), gen.get_state(), time.perf_counter() - t0


class RayEngine(Engine):
    """`Engine` whose sites train as parallel Ray tasks (``cpus_per_site`` / ``gpus_per_site`` each)."""

    def __init__(self, *args: Any, cpus_per_site: float = 1.0, gpus_per_site: float = 0.0,
                 address: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.record:
            raise ConfigError(
                f"{self.world.path}: record-level DP-SGD sites ({', '.join(sorted(self.record))}) do not run on "
                "Ray yet; use the in-process backend (drop --backend ray)"
            )
        from dataclasses import replace

        from worldlm_secure.federation.ray_backend import ensure_ray

        self._ray = ensure_ray(address)
        self._task = self._ray.remote(num_cpus=cpus_per_site, num_gpus=gpus_per_site)(train_site)
        spec = replace(self.settings.model, vocab_size=self.model.get_input_embeddings().num_embeddings)
        self._config = (spec, self.settings.train, self.trainer.total_steps, self.settings.device,
                        max(1, int(cpus_per_site)), self.settings.seed)
        self._train_refs = {s.name: self._ray.put(s.train) for s in self.sites}  # shipped once, not per round
        self.site_seconds: dict[str, float] = {}

    def _train_sites(self, round_id: int) -> float:
        steps = self.settings.train.local_steps
        start_step = (round_id - 1) * steps
        refs = {
            s.name: self._task.remote(self._config, s.params, s.opt_state, s.generator.get_state(),
                                      self._train_refs[s.name], start_step)
            for s in self.sites
        }
        losses = []
        for s in self.sites:  # sites finish in any order; results are applied in the engine's site order
            loss, params, s.opt_state, gen_state, seconds = self._ray.get(refs[s.name])
            s.params = params
            s.generator.set_state(gen_state)
            self.site_seconds[s.name] = self.site_seconds.get(s.name, 0.0) + seconds
            losses.append(loss)
            if self.on_site:
                self.on_site(s.name, round_id)
        return float(np.nanmean(losses)) if not np.all(np.isnan(losses)) else float("nan")

    def shutdown(self) -> None:
        """Drop the references to the sites' data in Ray's object store."""
        self._train_refs = {}
