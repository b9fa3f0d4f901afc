"""Quantization and multi-value slot packing for CKKS (pure integer math, no encryption)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worldlm_secure.secagg import ckks_packing as packing

VECTORS = Path(__file__).resolve().parent.parent / "protocols" / "vectors" / "ckks.json"


@settings(deadline=None, max_examples=40)
@given(
    slot_bits=st.integers(10, 43),
    value_bits=st.integers(2, 24),
    members=st.integers(1, 9),
    n_values=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
)
def test_sum_of_packed_vectors_unpacks_to_exact_sum(slot_bits, value_bits, members, n_values, seed):
    h = packing.headroom_for(members)
    if slot_bits < h + 2:
        return
    layout = packing.plan_layout(slot_bits, value_bits, h)
    rng = np.random.default_rng(seed)
    top = (1 << (value_bits + 1)) - 2
    # extremes included: all zeros / all max are the carry worst cases
    vals = [rng.integers(0, top + 1, n_values) for _ in range(members - 1)] + [np.full(n_values, top)]
    slots = [packing.pack(v, layout) for v in vals]
    for s in slots:
        assert s.size == layout.slots_for(n_values)
        assert np.all(np.abs(s) <= 2.0 ** (slot_bits - 1))  # centered: what the CKKS decoder sees is small
    total = np.sum(slots, axis=0)
    assert np.all(np.abs(total) < 2.0**slot_bits)  # the bound ckks_params budgets for
    out = packing.unpack_sum(total, n_values, members, layout)
    assert np.array_equal(out, np.sum(vals, axis=0))


def test_values_wider_than_a_slot_are_split_across_slots():
    layout = packing.plan_layout(slot_bits=12, value_bits=20, headroom=3)
    assert layout.values_per_slot < 1
    assert max(p.slot for p in layout.pieces) >= 2  # a 21-bit value needs several 12-bit slots
    v = np.array([0, 1, (1 << 21) - 2, 12345], dtype=np.int64)
    total = sum(packing.pack(v, layout) for _ in range(8))
    assert np.array_equal(packing.unpack_sum(total, 4, 8, layout), 8 * v)


def test_default_layout_packs_more_than_one_value_per_slot():
    # slot_bits 41 (N=4096, [60, 49], scale 2^17), 21-bit values, 16 members -> 3 values in 2 slots
    layout = packing.plan_layout(41, 20, packing.headroom_for(16))
    assert layout.values_per_slot >= 1.5
    for p in layout.pieces:
        assert p.offset + p.width + layout.headroom <= 41


@settings(deadline=None, max_examples=30)
@given(x=st.lists(st.floats(-3, 3, allow_nan=False), min_size=1, max_size=50), bits=st.integers(4, 24))
def test_quantization_error_is_within_documented_precision(x, bits):
    c = 1.5
    v, clipped = packing.quantize(np.array(x), c, bits)
    assert clipped == sum(abs(t) > c for t in x)
    back = packing.dequantize_sum(v, 1, c, bits)
    err = np.abs(back - np.clip(x, -c, c))
    assert np.all(err <= c / (2 ** (bits + 1) - 2) * (1 + 1e-12))


def test_quantize_refuses_nan():
    with pytest.raises(ValueError):
        packing.quantize(np.array([0.0, np.nan]), 1.0, 20)


def test_unpack_refuses_non_integer_or_out_of_range_slots():
    layout = packing.plan_layout(41, 20, 2)
    s = packing.pack(np.zeros(10, dtype=np.int64), layout)
    with pytest.raises(packing.PackingError, match="off an integer"):
        packing.unpack_sum(s + 0.48, 10, 1, layout)
    with pytest.raises(packing.PackingError, match="range"):
        packing.unpack_sum(s + 2.0**45, 10, 1, layout)
    with pytest.raises(packing.PackingError, match="expected"):
        packing.unpack_sum(s[:1], 10, 1, layout)


def test_vectors_file_matches_implementation():
    doc = json.loads(VECTORS.read_text())
    for case in doc["packing"]:
        layout = packing.plan_layout(case["slot_bits"], case["value_bits"], case["headroom"])
        assert [layout.block_slots, layout.block_values] == case["block"]
        assert [[p.value, p.shift, p.width, p.slot, p.offset] for p in layout.pieces] == case["pieces"]
        v, clipped = packing.quantize(np.array(case["input"]), case["clip_range"], case["value_bits"])
        assert v.tolist() == case["quantized"] and clipped == case["clipped"]
        slots = packing.pack(v, layout)
        assert slots.astype(np.int64).tolist() == case["slots"]
        out = packing.unpack_sum(slots * case["members"], len(v), case["members"], layout)
        assert out.tolist() == [case["members"] * q for q in case["quantized"]]
