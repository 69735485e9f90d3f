"""Edge cases of fedfar.federation.codecs that tests/test_deltas.py and tests/test_properties.py leave open.

What this file proves, each with values worked out by hand:

* the int8 wire codes are symmetric and saturate: codes stay in [-127, 127] and never wrap around (no sign flip)
  even when the row's scale rounds into float32 subnormals, and a row too small for a nonzero scale is all-zero
  codes; the scales are float32 whatever torch's default dtype;
* a packed record is two flat uint8 byte arrays, the index a compact JSON list of [name, dtype, shape, stype, bytes];
* reconstruction_error pools every tensor into one relative L2 error, and an all-zero reference is no division by 0;
* every malformed input is a clear error that names the offending key and, for key sets, which side lacks which;
* state_delta / apply_delta follow the base (or new) tensor's device and dtype, carry untouched keys over in any
  order, and add integer buffers exactly but refuse to scale them.
"""
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedfar.federation.codecs import (INDEX, PACKED, SCALE_SUFFIX, apply_delta, decode, encode, pack, payload_nbytes,
                                      reconstruction_error, serialized_nbytes, state_delta)

TINY = 2.0**-149  # the smallest positive float32 (a subnormal)


def _codes(record: ArrayRecord, name: str) -> np.ndarray:
    return np.frombuffer(record[name].data, dtype=np.int8)


def _scales(record: ArrayRecord, name: str) -> np.ndarray:
    return np.frombuffer(record[name + SCALE_SUFFIX].data, dtype="<f4")


# ---------------------------------------------------------------- int8 wire codes


def test_int8_codes_saturate_at_127_without_wrapping_when_the_scale_rounds_into_subnormals():
    # max|row| = 177 TINY: 177/127 TINY rounds to 1 TINY, so x / scale reaches +-177. Without saturation those
    # wrap around in int8 (to -79 / +79): the decoded sign would flip.
    t = torch.tensor([[177 * TINY, -177 * TINY, 3 * TINY], [-177 * TINY, 5 * TINY, 0.0]])
    rec = encode({"w": t}, "int8")
    assert _scales(rec, "w").tolist() == [TINY, TINY]
    assert _codes(rec, "w").tolist() == [127, -127, 3, -127, 5, 0]  # symmetric: -128 is never used
    out = decode(rec)["w"]
    assert torch.equal(out, torch.tensor([[127 * TINY, -127 * TINY, 3 * TINY], [-127 * TINY, 5 * TINY, 0.0]]))


def test_int8_rows_too_small_for_a_nonzero_scale_are_zero_codes():
    # 50 TINY / 127 rounds to a zero scale: such a row, like an all-zero row, is sent as q = 0 (not +-127 * 0).
    t = torch.tensor([[50 * TINY, -20 * TINY], [0.0, 0.0], [127.0, -32.0]])
    rec = encode({"w": t}, "int8")
    assert _scales(rec, "w").tolist() == [0.0, 0.0, 1.0]
    assert _codes(rec, "w").tolist() == [0, 0, 0, 0, 127, -32]
    assert torch.equal(decode(rec)["w"], torch.tensor([[0.0, 0.0], [0.0, 0.0], [127.0, -32.0]]))


def test_int8_scales_are_float32_whatever_torchs_default_dtype():
    # A (3, 0) tensor takes the empty-row branch: its 3 scales must still be 4-byte float32, as the wire says.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        t = {"empty_cols": torch.zeros(3, 0, dtype=torch.float32), "w": torch.ones(2, 2, dtype=torch.float32)}
        rec = encode(t, "int8")
        assert len(rec["empty_cols" + SCALE_SUFFIX].data) == 3 * 4
        assert payload_nbytes(rec) == 0 + 3 * 4 + 4 * 1 + 2 * 4  # codes and float32 scales of both tensors
        out = decode(rec)
    finally:
        torch.set_default_dtype(previous)
    assert out["empty_cols"].shape == (3, 0) and torch.equal(out["w"], torch.ones(2, 2))


# ---------------------------------------------------------------- packed layout


def test_a_packed_record_is_two_flat_uint8_arrays_and_a_compact_json_index():
    rec = encode({"a": torch.ones(2, 3), "i": torch.arange(4, dtype=torch.int16)}, "float16")
    packed = pack(rec)
    data, index = packed[PACKED], packed[INDEX]
    assert (data.dtype, tuple(data.shape), data.stype) == ("uint8", (2 * 3 * 2 + 4 * 2,), "fedfar.raw")
    meta = b'[["a","float16",[2,3],"fedfar.raw",12],["i","int16",[4],"fedfar.raw",8]]'
    assert (index.dtype, tuple(index.shape), index.stype, bytes(index.data)) == ("uint8", (len(meta),),
                                                                                "fedfar.raw", meta)
    assert bytes(data.data) == bytes(rec["a"].data) + bytes(rec["i"].data)


# ---------------------------------------------------------------- reconstruction error


def test_reconstruction_error_pools_every_tensor_into_one_relative_l2():
    # Errors and references summed over both tensors: sqrt(0.125^2 / (0.375^2 + 0.5^2)) = 0.125 / 0.625 = 0.2.
    original = {"a": torch.tensor([0.375, 0.0]), "b": torch.tensor([0.0, 0.5])}
    decoded = {"a": torch.tensor([0.25, 0.0]), "b": torch.tensor([0.0, 0.5])}
    err = reconstruction_error(original, decoded)
    assert err["max_abs"] == 0.125
    assert err["rel_l2"] == pytest.approx(0.2, rel=1e-12)


def test_reconstruction_error_of_an_all_zero_reference_is_zero_not_a_division_by_zero():
    zeros = {"w": torch.zeros(3), "empty": torch.zeros(0, 2)}  # e.g. a client whose delta did not move
    assert reconstruction_error(zeros, {k: v.clone() for k, v in zeros.items()}) == {"max_abs": 0.0, "rel_l2": 0.0}


def test_reconstruction_error_names_the_keys_missing_on_each_side():
    msg = "Key sets differ: missing from decoded: ['b']; missing from original: ['c']"
    with pytest.raises(ValueError, match=re.escape(msg)):
        reconstruction_error({"a": torch.ones(1), "b": torch.ones(1)}, {"a": torch.ones(1), "c": torch.ones(1)})
    with pytest.raises(ValueError, match=re.escape("missing from decoded: ['b']; missing from original: []")):
        reconstruction_error({"a": torch.ones(1), "b": torch.ones(1)}, {"a": torch.ones(1)})


# ---------------------------------------------------------------- malformed input


def test_complex_tensors_are_refused_by_name():
    with pytest.raises(TypeError, match=re.escape("Complex tensor 'z' is not supported")):
        encode({"z": torch.ones(2, dtype=torch.complex64)}, "float32")


def test_a_key_that_clashes_with_int8_scales_is_refused_by_name():
    t = {"w": torch.ones(2), "w" + SCALE_SUFFIX: torch.ones(1)}
    with pytest.raises(ValueError, match=re.escape("Key 'w::int8_scale' clashes with the scales of 'w'")):
        encode(t, "int8")


def test_decode_names_an_array_of_unknown_stype():
    rec = ArrayRecord({"w": Array(dtype="float32", shape=(2,), stype="pickle", data=bytes(8))})
    with pytest.raises(ValueError, match=re.escape("Array 'w' has unsupported stype 'pickle'")):
        decode(rec)


def test_decode_names_a_qint8_array_whose_scales_are_missing():
    rec = encode({"w": torch.ones(2, 2)}, "int8")
    rec.pop("w" + SCALE_SUFFIX)
    with pytest.raises(ValueError, match=re.escape("qint8 array 'w' has no scales under 'w::int8_scale'")):
        decode(rec)


def test_serialized_nbytes_names_the_type_it_got():
    with pytest.raises(TypeError, match=re.escape("Expected ArrayRecord, RecordDict or Message, got dict")):
        serialized_nbytes({"w": torch.ones(1)})


# ---------------------------------------------------------------- delta arithmetic


def test_state_delta_names_the_keys_missing_on_each_side():
    with pytest.raises(ValueError, match=re.escape("missing from old: ['only_new']; missing from new: ['only_old']")):
        state_delta({"x": torch.ones(2), "only_new": torch.ones(2)}, {"x": torch.ones(2), "only_old": torch.ones(2)})
    with pytest.raises(ValueError, match=re.escape("missing from old: ['extra']; missing from new: []")):
        state_delta({"x": torch.ones(2), "extra": torch.ones(2)}, {"x": torch.ones(2)})


def test_state_delta_and_apply_delta_follow_the_models_device():
    # "meta" stands in for an accelerator (so this runs without a GPU): a trained model there minus a CPU snapshot,
    # and a CPU-decoded delta applied to a model there. Mixing devices in one op would raise.
    new = {"w": torch.empty(2, 3, device="meta")}
    delta = state_delta(new, {"w": torch.zeros(2, 3)})
    assert delta["w"].device.type == "meta" and delta["w"].shape == (2, 3)
    out = apply_delta(new, {"w": torch.ones(2, 3)}, scale=0.5)
    assert out["w"].device.type == "meta" and out["w"].shape == (2, 3)


def test_apply_delta_carries_untouched_keys_over_whatever_their_order():
    base = {"frozen": torch.tensor([1.0, 2.0]), "w": torch.tensor([1.0, 1.0]), "later": torch.tensor([7.0])}
    out = apply_delta(base, {"w": torch.tensor([0.5, -1.0])})
    assert list(out) == ["frozen", "w", "later"]
    assert torch.equal(out["frozen"], base["frozen"]) and torch.equal(out["later"], base["later"])
    assert torch.equal(out["w"], torch.tensor([1.5, 0.0]))


def test_apply_delta_keeps_a_half_precision_base_in_half_precision():
    # decode returns float32 deltas; a float16 model must stay float16: 1 + 0.5 * 0.25 = 1.125, exact in fp16.
    out = apply_delta({"w": torch.ones(3, dtype=torch.float16)}, {"w": torch.full((3,), 0.25)}, scale=0.5)
    assert out["w"].dtype == torch.float16 and torch.equal(out["w"], torch.full((3,), 1.125, dtype=torch.float16))


def test_apply_delta_names_a_shape_mismatch():
    msg = "Shape mismatch for 'w': base torch.Size([2]) vs delta torch.Size([3])"
    with pytest.raises(ValueError, match=re.escape(msg)):
        apply_delta({"w": torch.ones(2)}, {"w": torch.ones(3)})


def test_apply_delta_adds_integer_buffers_exactly_and_refuses_to_scale_them():
    base = {"steps": torch.tensor([5, -2], dtype=torch.int32)}
    out = apply_delta(base, {"steps": torch.tensor([3, 4], dtype=torch.int64)})
    assert out["steps"].dtype == torch.int32 and torch.equal(out["steps"], torch.tensor([8, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=re.escape("Cannot scale the delta of integer tensor 'steps' by 0.5")):
        apply_delta(base, {"steps": torch.tensor([3, 4])}, scale=0.5)
