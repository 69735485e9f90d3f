"""Tests for fedfar.federation.codecs: codecs, byte accounting and delta arithmetic."""

import pytest
import torch
from flwr.app import ArrayRecord, Message, RecordDict
from flwr.common.serde import array_record_to_proto, message_to_proto, recorddict_to_proto

from fedfar.federation.codecs import (
    CODECS,
    SCALE_SUFFIX,
    apply_delta,
    decode,
    encode,
    payload_nbytes,
    reconstruction_error,
    serialized_nbytes,
    state_delta,
)

SHAPES = {
    "bert.encoder.layer.0.intermediate.dense.w1_learner": (7, 5),
    "bert.encoder.layer.0.output.dense.bias": (11,),
    "classifier.weight": (2, 3, 4),
    "empty_rows": (0, 6),
    "empty_cols": (3, 0),
    "scalar": (),
}


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def _float_numel(ts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in ts.values())


# ---------------------------------------------------------------- codecs


def test_float32_round_trip_is_bit_exact(tensors):
    out = decode(encode(tensors, "float32"))
    assert list(out) == list(tensors)
    for k, t in tensors.items():
        assert out[k].dtype == torch.float32 and out[k].shape == t.shape
        assert torch.equal(out[k], t), k
    assert reconstruction_error(tensors, out) == {"max_abs": 0.0, "rel_l2": 0.0}


@pytest.mark.parametrize("codec,eps", [("float16", 2.0**-11), ("bfloat16", 2.0**-8)])
def test_half_codecs_within_rounding_and_half_payload(tensors, codec, eps):
    # Keep magnitudes in fp16's normal range so relative rounding bound applies.
    tensors = {k: t.sign() * (t.abs() + 1e-3) for k, t in tensors.items()}
    rec = encode(tensors, codec)
    out = decode(rec)
    for k, t in tensors.items():
        assert out[k].dtype == torch.float32 and out[k].shape == t.shape
        rel = (out[k] - t).abs() / t.abs()
        assert torch.all(rel <= eps), (k, rel.max())
    assert rec[next(iter(tensors))].dtype == codec  # self-describing
    assert payload_nbytes(rec) * 2 == payload_nbytes(encode(tensors, "float32"))
    assert payload_nbytes(rec) == 2 * _float_numel(tensors)


def test_bfloat16_is_not_float16(tensors):
    # Values too large for fp16 survive bfloat16 (catches a codec mix-up).
    big = {"w": torch.tensor([1e6, -3e30, 7.0])}
    out = decode(encode(big, "bfloat16"))["w"]
    assert torch.allclose(out, big["w"], rtol=2.0**-8)


def test_int8_error_bound_zero_row_and_payload(tensors):
    tensors = dict(tensors)
    w = torch.randn(6, 9)
    w[2] = 0.0  # zero row must decode to exact zeros
    w[4] *= 1000.0  # rows are scaled independently
    tensors["w"] = w
    rec = encode(tensors, "int8")
    out = decode(rec)
    assert list(out) == list(tensors)  # scale companions do not leak into keys
    for k, t in tensors.items():
        assert out[k].shape == t.shape and out[k].dtype == torch.float32
        n_rows = 1 if t.dim() <= 1 else t.shape[0]
        rows = t.reshape(n_rows, t.numel() // n_rows if n_rows else 0)
        got = out[k].reshape(rows.shape)
        if rows.numel():
            bound = rows.abs().amax(dim=1, keepdim=True) / 254 * (1 + 1e-5)
            assert torch.all((got - rows).abs() <= bound), k
    assert torch.equal(out["w"][2], torch.zeros(9))
    # Row 0 must not be crushed by row 4's 1000x magnitude: per-row, not per-tensor.
    assert (out["w"][0] - w[0]).abs().max() <= w[0].abs().max() / 254 * (1 + 1e-5)
    n_rows = sum(1 if t.dim() <= 1 else t.shape[0] for t in tensors.values())
    assert payload_nbytes(rec) == _float_numel(tensors) + 4 * n_rows
    assert rec["w"].dtype == "qint8" and rec["w" + SCALE_SUFFIX].dtype == "float32"


def test_int8_record_is_under_027_of_float32():
    t = {"bert.encoder.layer.0.attention.self.query.weight": torch.randn(1000, 384)}
    s8 = serialized_nbytes(encode(t, "int8"))
    s32 = serialized_nbytes(encode(t, "float32"))
    assert s8 < 0.27 * s32, (s8, s32)


@pytest.mark.parametrize("codec", CODECS)
def test_integer_tensors_pass_through(codec):
    ints = {
        "idx": torch.tensor([3, 1, 2**40, -5], dtype=torch.int64),
        "small": torch.tensor([[1, -2], [3, 4]], dtype=torch.int8),
        "mask": torch.tensor([True, False, True]),
    }
    out = decode(encode({**ints, "f": torch.randn(3)}, codec))
    for k, t in ints.items():
        assert out[k].dtype == t.dtype and torch.equal(out[k], t), k


def test_unknown_codec_error_names_it():
    with pytest.raises(ValueError, match="int4") as exc:
        encode({"w": torch.ones(2)}, "int4")
    assert all(c in str(exc.value) for c in CODECS)


def test_decode_accepts_plain_flower_record():
    sd = {"w": torch.randn(3, 2), "i": torch.arange(3)}
    out = decode(ArrayRecord(sd))
    assert torch.equal(out["w"], sd["w"]) and torch.equal(out["i"], sd["i"])


# ---------------------------------------------------------------- byte accounting


def test_serialized_nbytes_matches_flower_protobuf():
    t = {"big": torch.randn(512, 256), "b": torch.randn(256)}
    rec = encode(t, "float32")
    ref = len(array_record_to_proto(rec).SerializeToString())
    assert serialized_nbytes(rec) == ref
    payload = payload_nbytes(rec)
    assert payload == 4 * (512 * 256 + 256)
    assert ref > payload
    assert (ref - payload) < 0.001 * payload  # protobuf framing is tiny vs data
    rd = RecordDict({"delta": rec})
    assert serialized_nbytes(rd) == len(recorddict_to_proto(rd).SerializeToString())
    assert serialized_nbytes(rd) > serialized_nbytes(rec)


def test_serialized_nbytes_of_message(task_identity):
    rd = RecordDict({"delta": encode({"w": torch.randn(64, 32)}, "float16")})
    msg = Message(content=rd, dst_node_id=7, message_type="train")
    n = serialized_nbytes(msg)
    assert n == len(message_to_proto(msg).SerializeToString())
    assert n > serialized_nbytes(rd)  # metadata adds bytes


def test_serialized_nbytes_rejects_other_types():
    with pytest.raises(TypeError):
        serialized_nbytes({"w": torch.ones(1)})


# ---------------------------------------------------------------- delta arithmetic


def test_state_delta_apply_delta_round_trip():
    g = torch.Generator().manual_seed(1)
    old = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}
    new = {k: v + torch.randn(v.shape, generator=g) for k, v in old.items()}
    old_copy = {k: v.clone() for k, v in old.items()}
    delta = state_delta(new, old)
    assert torch.allclose(delta["a"], new["a"] - old["a"])
    rebuilt = apply_delta(old, delta)
    for k in new:
        assert torch.allclose(rebuilt[k], new[k])
        assert torch.equal(old[k], old_copy[k])  # base untouched
    half = apply_delta(old, delta, scale=0.5)
    assert torch.allclose(half["a"], old["a"] + 0.5 * delta["a"])
    # Keys outside the delta are carried over as independent copies.
    partial = apply_delta(old, {"a": delta["a"]})
    assert torch.equal(partial["b"], old["b"])
    partial["b"].add_(1.0)
    assert torch.equal(old["b"], old_copy["b"])


def test_delta_through_codec_round_trip():
    old = {"w": torch.randn(8, 4)}
    new = {"w": old["w"] + 0.01 * torch.randn(8, 4)}
    rebuilt = apply_delta(old, decode(encode(state_delta(new, old), "int8")))
    assert torch.allclose(rebuilt["w"], new["w"], atol=0.01 * 5 / 127)


def test_mismatched_keys_name_the_missing():
    a = {"x": torch.ones(2), "only_new": torch.ones(2)}
    b = {"x": torch.ones(2), "only_old": torch.ones(2)}
    with pytest.raises(ValueError, match="only_new") as exc:
        state_delta(a, b)
    assert "only_old" in str(exc.value)
    with pytest.raises(ValueError, match="ghost"):
        apply_delta({"x": torch.ones(2)}, {"ghost": torch.ones(2)})
    with pytest.raises(ValueError, match="x"):
        state_delta({"x": torch.ones(2)}, {"x": torch.ones(3)})
