"""The AutoAWQ GEMM layout, checked against an unpacker written here from the published description:

  qweight int32 [in, out/8]: nibble i (bits 4i..4i+3) of word j holds column 8j + order[i],
  order = [0, 2, 4, 6, 1, 3, 5, 7]; qzeros int32 [in/G, out/8] packed the same way;
  scales fp16 [in/G, out]; w = (q - zero) * scale.
"""
import numpy as np
import pytest

from awq_edge import packing

PUBLISHED_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def unpack_by_description(packed: np.ndarray) -> np.ndarray:
    rows, words = packed.shape
    out = np.zeros((rows, words * 8), dtype=np.int64)
    for r in range(rows):
        for j in range(words):
            word = int(packed[r, j]) & 0xFFFFFFFF
            for i in range(8):
                out[r, 8 * j + PUBLISHED_ORDER[i]] = (word >> (4 * i)) & 0xF
    return out


def random_quantized(rng, out_f, in_f, group):
    groups = -(-in_f // group)
    q = rng.integers(0, 16, (out_f, in_f), dtype=np.uint8)
    zeros = rng.integers(0, 16, (out_f, groups), dtype=np.uint8)
    scales = rng.uniform(1e-3, 2e-2, (out_f, groups)).astype(np.float16)
    return q, scales, zeros


@pytest.mark.parametrize("out_f,in_f,group", [(16, 64, 32), (24, 576, 128), (8, 96, 64)])
def test_gemm_layout_matches_published_description(out_f, in_f, group):
    rng = np.random.default_rng(out_f * in_f)
    q, scales, zeros = random_quantized(rng, out_f, in_f, group)
    t = packing.to_awq_gemm(q, scales, zeros, group)
    groups = -(-in_f // group)
    assert t["qweight"].dtype == np.int32 and t["qweight"].shape == (in_f, out_f // 8)
    assert t["qzeros"].dtype == np.int32 and t["qzeros"].shape == (groups, out_f // 8)
    assert t["scales"].dtype == np.float16 and t["scales"].shape == (groups, out_f)
    np.testing.assert_array_equal(unpack_by_description(t["qweight"]), q.T)
    np.testing.assert_array_equal(unpack_by_description(t["qzeros"]), zeros.T)
    # and the dequantized value, from the description alone
    g = np.arange(in_f) // group
    w = (unpack_by_description(t["qweight"]).T - unpack_by_description(t["qzeros"]).T[:, g]) \
        * t["scales"].T.astype(np.float32)[:, g]
    np.testing.assert_allclose(packing.dequantize(q, scales, zeros, group), w, rtol=0, atol=0)


def test_round_trip_and_group_inference():
    rng = np.random.default_rng(0)
    q, scales, zeros = random_quantized(rng, 32, 576, 128)
    q2, s2, z2 = packing.from_awq_gemm(**packing.to_awq_gemm(q, scales, zeros, 128))
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(z2, zeros)
    np.testing.assert_array_equal(s2, scales)
    assert packing.infer_group_size(576, 5, 128) == 128  # ragged: 4 full groups + one of 64
    assert packing.infer_group_size(576, 9, 128) == 64


def test_plugin_layout_is_k_contiguous_with_awq_nibble_order():
    rng = np.random.default_rng(1)
    q, scales, zeros = random_quantized(rng, 8, 64, 32)
    t = packing.pack_for_plugin(q, scales, zeros, 32)
    assert t["qweight"].shape == (8, 8)
    np.testing.assert_array_equal(unpack_by_description(t["qweight"]), q)
    np.testing.assert_array_equal(t["zeros"].astype(np.uint8), zeros)


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError):
        packing.pack_int4(np.zeros((2, 7), np.uint8))
    with pytest.raises(ValueError):
        packing.pack_int4(np.full((2, 8), 16, np.uint8))
    with pytest.raises(ValueError):
        packing.to_awq_gemm(np.zeros((8, 64), np.uint8), np.ones((8, 1), np.float16), np.zeros((8, 1), np.uint8), 32)


def test_int8_rows_round_trip_within_half_a_step():
    """The cuda engine's int8 head (packing.quantize_rows_int8): per 32 values of a row one fp16
    scale, max|w| / 127; every value back within half a step, a zero block stays zero, and a row
    length that 32 does not divide gets a short last block."""
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((50, 136)) * rng.uniform(0.01, 3, (50, 1))).astype(np.float16)
    table[3, 32:64] = 0
    q, scales = packing.quantize_rows_int8(table)
    assert q.dtype == np.int8 and q.shape == table.shape and scales.shape == (50, 5) and scales.dtype == np.float16
    assert np.abs(q).max() <= 127 and scales[3, 1] == 0 and not q[3, 32:64].any()
    back = packing.dequantize_rows_int8(q, scales)
    step = np.repeat(scales.astype(np.float32), 32, axis=1)[:, :136]
    assert np.all(np.abs(back - table.astype(np.float32)) <= step / 2 + 1e-6 * np.abs(table.astype(np.float32)))
