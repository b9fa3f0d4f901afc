"""Local training: device choice, the plain torch loop, evaluation; one site's local round is `train.site`."""

from worldlm_secure.train.device import autocast_for, pick_device, set_threads
from worldlm_secure.train.loop import LocalTrainer, TrainConfig, as_sequences, lr_at

__all__ = ["LocalTrainer", "TrainConfig", "as_sequences", "autocast_for", "lr_at", "pick_device", "set_threads"]
