"""Check that a DP entry's noise was sized for the sensitivity its release needs (protocols/dp.md §2.7-2.8).

The accountant sees only `noise_multiplier` z; the noise std on the sum is z × the sensitivity the noise was
sized at. Under `central_gaussian` on a quantizing protocol the aggregator noises the *decoded* sum, which one
member moves by its quantized vector, so the noise must be sized at S_q = S + √d·e, and the entry records
`extra.noise_sensitivity` (S_q) and `extra.quantization_slack` (√d·e). `ledger verify` checks:

- both fields are recorded together, as finite floats, the slack ≥ 0;
- ``noise_sensitivity ≥ S + quantization_slack``, with S the sensitivity of one member's vector as the entry's
  mechanism defines it: `clipping_norm` (the weight words are zero under DP, every weight ≤ 1), or with
  adaptive clipping S = C_t·z_Δ/z (update and count words; `extra.adaptive_clip_vector_z` at the entry's z,
  whose split must recombine to `noise_multiplier`);
- under central noise on `masking` / `ckks`: ``quantization_slack ≥ √d_min · e_min``. d_min is the recorded
  `extra.released_dim` (an integer ≥ the number of released tensors); entries written before it was recorded
  use the number of released tensors (each has at least one value), a weaker bound. e_min is the
  smallest per-value rounding error any round this member could have been in has (`rounding_error_floor`):
  the round's precision is the largest of its members' policies, at most the schema's cap, its clip_range
  at least this member's and at least the clip, its roster at least the contributors (`cohort_size`). So the
  bound is sound for every valid ledger and catches a slack of zero or far below the protocol's rounding, and
  with `released_dim` recorded also a slack computed for a smaller d than the one recorded.

An entry under central noise on a quantizing protocol that records neither field (written before §2.8, or by
hand) is not a failure: verify cannot tell what its noise was sized at, and says so in the report's notes.
"""

from __future__ import annotations

import math
from typing import Any

from worldlm_secure.ledger.entry import LedgerEntry

NOISE_SENSITIVITY = "noise_sensitivity"
QUANTIZATION_SLACK = "quantization_slack"
RELEASED_DIM = "released_dim"
QUANTIZING = ("masking", "ckks")
CENTRAL = "central_gaussian"
# The policy schema's precision caps (policy/schema.py: MaskingParams.bits, CkksParams.value_bits; a test checks):
# the round's precision is its members' largest, never above these.
MASKING_MAX_BITS = 62
CKKS_MAX_VALUE_BITS = 40
# privacy/quantization.py's float64 term, 4·n·clip_range·2⁻⁵², part of every quantizer's e.
_FLOAT_ULPS = 4.0 * 2.0**-52
_REL_TOL = 1e-9  # the recorded sum S + √d·e vs its recomputation from the recorded parts (rounding only)


def rounding_error_floor(protocol: str, clip_range: float, roster: int) -> float:
    """The smallest per-value rounding error e (privacy/quantization.py `rounding_error`) a round of ``protocol``
    can have with at least ``roster`` members and a quantizer range of at least ``clip_range``, whatever its
    precision: the step at the schema's precision cap plus the float64 term. 0 for other protocols."""
    c, n = float(clip_range), max(1, int(roster))
    if protocol == "masking":  # 1/scale, scale = (2^(b−1) − 1 − n)/(n·c) (secagg/quantize.py), b ≤ 62
        step = n * c / (2.0 ** (MASKING_MAX_BITS - 1) - 1.0 - n)
    elif protocol == "ckks":  # clip_range/(2^(p+1) − 2) (secagg/ckks_packing.py), p ≤ 40
        step = c / (2.0 ** (CKKS_MAX_VALUE_BITS + 1) - 2.0)
    else:
        return 0.0
    return step + _FLOAT_ULPS * n * c


def _number(extra: Any, key: str) -> float | None | str:
    """The float recorded as ``extra[key]``, None when absent, or why it is unusable."""
    if key not in extra:
        return None
    v = extra[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        return f"extra.{key}: recorded {v!r}, not a finite number"
    return float(v)


def _quantizer_range(e: LedgerEntry, doc: dict[str, Any] | None) -> float:
    """A lower bound on the round's quantizer range: the round's clip_range is the largest of its members'
    (policy.plan_round), so at least this member's, and at least the clip used (the release path refuses a
    smaller one: `_check_quantizer_range`)."""
    c = max(e.clipping_norm, 0.0)
    section = ((doc or {}).get("secure_aggregation") or {}).get(e.protocol)
    own = section.get("clip_range") if isinstance(section, dict) else None
    if isinstance(own, (int, float)) and not isinstance(own, bool) and math.isfinite(own):
        c = max(c, float(own))
    return c


def _sensitivity(e: LedgerEntry) -> tuple[float, str] | str:
    """S of one member's vector as the entry's mechanism defines it, and how it was obtained (or a problem)."""
    vz = _number(e.extra, "adaptive_clip_vector_z")
    if vz is None:
        return e.clipping_norm, f"clipping_norm {e.clipping_norm!r}"
    if isinstance(vz, str):
        return vz
    sb = _number(e.extra, "adaptive_clip_count_stddev")
    if isinstance(sb, str):
        return sb
    z = e.noise_multiplier
    if sb is None or not (vz > 0 and sb > 0 and z > 0):
        return "adaptive clipping: extra.adaptive_clip_vector_z and adaptive_clip_count_stddev must both be > 0"
    combined = (vz**-2 + (2.0 * sb) ** -2) ** -0.5
    if not math.isclose(combined, z, rel_tol=1e-6):
        return (f"adaptive clipping: the recorded split (adaptive_clip_vector_z {vz!r}, adaptive_clip_count_stddev "
                f"{sb!r}) recombines to z={combined!r}, not the entry's noise_multiplier {z!r}")
    s = max(e.clipping_norm, e.clipping_norm * vz / z)  # z_Δ ≥ z: the count words only add
    return s, f"C_t·z_Δ/z = {e.clipping_norm!r}·{vz!r}/{z!r}"


def check_noise_sensitivity(e: LedgerEntry, doc: dict[str, Any] | None) -> str | None:
    """The first problem with the sensitivity entry ``e``'s noise was sized at, or None. ``doc``: its stored
    effective policy (None when not stored); only its `secure_aggregation.<protocol>.clip_range` is read."""
    ns, qs = _number(e.extra, NOISE_SENSITIVITY), _number(e.extra, QUANTIZATION_SLACK)
    for v in (ns, qs):
        if isinstance(v, str):
            return v
    if ns is None and qs is None:
        return None
    if ns is None or qs is None:
        have, miss = (NOISE_SENSITIVITY, QUANTIZATION_SLACK) if qs is None else (QUANTIZATION_SLACK, NOISE_SENSITIVITY)
        return f"extra.{have} is recorded without extra.{miss}: the noise's sizing S + √d·e cannot be checked"
    assert isinstance(ns, float) and isinstance(qs, float)
    if qs < 0:
        return f"extra.{QUANTIZATION_SLACK}: recorded {qs!r}, must be >= 0"
    sens = _sensitivity(e)
    if isinstance(sens, str):
        return sens
    s, how = sens
    required = s + qs
    if ns < required * (1.0 - _REL_TOL):
        return (f"extra.{NOISE_SENSITIVITY}: recorded {ns!r}, required at least {required!r} = S + quantization_slack "
                f"(S = {how}, quantization_slack {qs!r}): the noise was sized below the sensitivity of the released "
                "sum (protocols/dp.md §2.8)")
    if e.mechanism == CENTRAL and e.protocol in QUANTIZING:
        d_min = max(1, len(e.tensor_names))
        dim = e.extra.get(RELEASED_DIM)
        if dim is not None:  # recorded since released_dim exists: the length released, so √d is exact
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < d_min:
                return (f"extra.{RELEASED_DIM}: recorded {dim!r}, must be an integer >= {d_min} (one value per "
                        "released tensor at least)")
            d_min = dim
        c = _quantizer_range(e, doc)
        floor = math.sqrt(d_min) * rounding_error_floor(e.protocol, c, e.cohort_size)
        if qs < floor * (1.0 - _REL_TOL):
            return (f"extra.{QUANTIZATION_SLACK}: recorded {qs!r}, required at least {floor!r} = √d·e for protocol "
                    f"{e.protocol} with d >= {d_min} released values, {max(1, e.cohort_size)} members and clip_range "
                    f">= {c!r} (e at the schema's finest precision): the quantizer's rounding was not covered "
                    "(protocols/dp.md §2.8)")
    return None


def unrecorded(e: LedgerEntry) -> bool:
    """A user-level entry under central noise on a quantizing protocol that records no noise_sensitivity: its
    noise's sizing cannot be checked (written before protocols/dp.md §2.8, or by hand)."""
    return (e.dp_level == "user" and e.mechanism == CENTRAL and e.protocol in QUANTIZING
            and NOISE_SENSITIVITY not in e.extra and QUANTIZATION_SLACK not in e.extra)
