"""Aggregation rules: weighted deltas (FedAvg), attentive (FedAtt), residual layer embeddings."""

from worldlm_secure.aggregation.attentive import AttentionConfig, client_weights, fedatt_update
from worldlm_secure.aggregation.residual import Blend, blend_from_sum, embed, flatten, mix_in, unflatten
from worldlm_secure.aggregation.weighted import DeltaCodec, plain_weighted_average

__all__ = [
    "AttentionConfig",
    "Blend",
    "DeltaCodec",
    "blend_from_sum",
    "client_weights",
    "embed",
    "fedatt_update",
    "flatten",
    "mix_in",
    "plain_weighted_average",
    "unflatten",
]
