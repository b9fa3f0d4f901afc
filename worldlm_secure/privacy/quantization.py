"""The sensitivity of a quantized release under central noise (protocols/dp.md §2.8).

Under `central_gaussian` the aggregator noises the *decoded* sum of the secure-summation protocol, so adding
or removing member k moves the noised sum by k's **quantized** vector Q(v_k), not by v_k. Each of its d values
is within e of v_k's (e: the protocol's per-value rounding error, public), so

    ‖Q(v_k)‖₂ ≤ ‖v_k‖₂ + ‖Q(v_k) − v_k‖₂ ≤ S + √d·e =: S_q

and the central noise is sized at z·S_q (`ReleasePath._release`), never z·S: the release is then at least as
private as the Gaussian of multiplier z the accountant charges. Per protocol:

- ``none``: no quantizer, e = 0 (S_q = S, byte for byte the old behaviour);
- ``ckks``: deterministic nearest rounding to steps of clip_range/(2^p − 1): e = clip_range/(2^(p+1) − 2);
- ``masking``: stochastic rounding to 1/scale, |q/scale − x| < 1/scale: e = 1/scale of the round's spec
  (`secagg.quantize.QuantizationSpec`, scale from bits, clip_range and the roster size);

plus, for both quantizers, a float64 term of 4·n·clip_range·2⁻⁵² (n = roster) covering the rounding of
x·scale and of the decoded sum (≤ n·clip_range in magnitude). Saturation at ±clip_range only shrinks values.
Distributed mechanisms already count rounding in their integer sensitivity Δ₂ = S/γ + √d (§3.2): this
module is for central noise only.
"""

from __future__ import annotations

import math

from worldlm_secure.errors import PolicyError

#: Adaptive clipping floors the clip at this multiple of √d·e (privacy/adaptive_clip.py), so the quantizer's
#: slack √d·e stays at most 1/QUANTIZATION_FLOOR_FACTOR = 10% of the clip, hence of S ≥ C_t.
QUANTIZATION_FLOOR_FACTOR = 10.0

_FLOAT_ULPS = 4.0 * 2.0**-52


def rounding_error(protocol: str, params: object, roster: int) -> float:
    """e: the largest |Q(x) − x| per value of one member's vector under ``protocol`` (policy section
    ``params``) in a round of ``roster`` invited members, in the vector's units. 0 for protocol none."""
    if protocol == "none":
        return 0.0
    clip_range = getattr(params, "clip_range", None)
    if clip_range is None or not (float(clip_range) > 0 and math.isfinite(float(clip_range))):
        raise PolicyError(f"secure_aggregation {protocol}.clip_range: needed to bound the quantizer's rounding")
    c, n = float(clip_range), max(1, int(roster))
    if protocol == "ckks":
        p = int(getattr(params, "value_bits"))
        step_error = c / (2.0 ** (p + 1) - 2.0)
    elif protocol == "masking":
        from worldlm_secure.secagg.masking import round_quantization

        step_error = 1.0 / round_quantization(params, n).scale
    else:  # fail closed: an unknown quantizer has no known bound
        raise PolicyError(f"secure_aggregation.protocol {protocol!r}: no rounding bound known for central noise")
    return step_error + _FLOAT_ULPS * n * c


def quantization_slack(dim: int, error: float) -> float:
    """√d·e: how far one member's quantized vector can be, in L2, from its float vector."""
    return math.sqrt(max(1, int(dim))) * float(error)


def quantized_sensitivity(sensitivity: float, dim: int, error: float) -> float:
    """S_q = S + √d·e: the L2 sensitivity of a decoded quantized sum whose float vectors have sensitivity S."""
    return float(sensitivity) + quantization_slack(dim, error)


def clip_floor(dim: int, error: float) -> float:
    """The smallest clip adaptive clipping may reach on a d-value release with rounding error e:
    QUANTIZATION_FLOOR_FACTOR·√d·e (0 without a quantizer). Public: from d, the protocol and the roster."""
    return QUANTIZATION_FLOOR_FACTOR * quantization_slack(dim, error)
