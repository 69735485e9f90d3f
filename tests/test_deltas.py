"""Tests for fedfar.federation.codecs: codecs, byte accounting and delta arithmetic."""
import json

import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedfar.federation.codecs import (
    CODECS,
    INDEX,
    PACKED,
    SCALE_SUFFIX,
    apply_delta,
    decode,
    encode,
    pack,
    payload_nbytes,
    reconstruction_error,
    serialized_nbytes,
    state_delta,
    unpack,
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


# An independent byte count: protobuf's wire format (a tag, a varint length, then the bytes, for every string,
# bytes or sub-message field; proto3 leaves empty strings and zero scalars out) over Flower 1.41's schema
# (flwr/proto/recorddict.proto and message.proto), from the tensors' own sizes. Field numbers here are all < 16,
# so every tag is one byte.
def _varint(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _field(number: int, size: int) -> int:
    return _varint(number << 3) + _varint(size) + size


def _text(number: int, s: str) -> int:
    return _field(number, len(s.encode())) if s else 0


def array_record_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """ArrayRecord {repeated Item {key = 1; Array value = 2}}, Array {dtype = 1; packed shape = 2; stype = 3;
    data = 4}, as codecs.py documents the float32 codec: stype "fedfar.raw", numel * itemsize data bytes."""
    total = 0
    for key, t in tensors.items():
        dtype = "float32" if t.is_floating_point() else str(t.dtype).removeprefix("torch.")
        nbytes = t.numel() * (4 if t.is_floating_point() else t.element_size())
        shape = sum(_varint(d) for d in t.shape)
        array = (_text(1, dtype) + (_field(2, shape) if t.dim() else 0) + _text(3, "fedfar.raw")
                 + (_field(4, nbytes) if nbytes else 0))
        total += _field(1, _text(1, key) + _field(2, array))
    return total


def packed_record_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """A packed float32 record: two uint8 arrays, the tensors' bytes end to end and the JSON index of
    [name, dtype, shape, stype, bytes] (codecs.pack), each framed as in `array_record_bytes`."""
    index, total = [], 0
    for key, t in tensors.items():
        nbytes = t.numel() * (4 if t.is_floating_point() else t.element_size())
        dtype = "float32" if t.is_floating_point() else str(t.dtype).removeprefix("torch.")
        index.append([key, dtype, list(t.shape), "fedfar.raw", nbytes])
        total += nbytes
    meta = len(json.dumps(index, separators=(",", ":")))

    def item(key: str, size: int) -> int:
        array = _text(1, "uint8") + _field(2, _varint(size)) + _text(3, "fedfar.raw") + (_field(4, size) if size else 0)
        return _field(1, _text(1, key) + _field(2, array))
    return item("::packed", total) + item("::index", meta)


def metric_record_bytes(metrics: dict) -> int:
    """MetricRecord {repeated Item {key = 1; MetricRecordValue value = 2}}: a float is a double (tag + 8 bytes),
    a small int a zigzag sint64 varint."""
    def value(v):
        return 1 + 8 if isinstance(v, float) else 1 + _varint(2 * v if v >= 0 else -2 * v - 1)
    return sum(_field(1, _text(1, k) + _field(2, value(v))) for k, v in metrics.items())


def record_dict_bytes(records: dict[str, tuple[int, int]]) -> int:
    """RecordDict {repeated Item {key = 1; oneof ArrayRecord = 2 | MetricRecord = 3 | ConfigRecord = 4}}; records
    maps each key to (that field number, the record's bytes)."""
    return sum(_field(1, _text(1, k) + _field(number, size)) for k, (number, size) in records.items())


def message_bytes(metadata, content: int) -> int:
    """Message {Metadata = 1; RecordDict content = 2}, Metadata from the message's own field values (ttl = 7 and
    created_at = 9 are doubles: a tag and 8 bytes; the task ids are `optional`, so sent even when 0)."""
    def uint(number, v):
        return _varint(number << 3) + _varint(v) if v else 0
    m = metadata
    meta = (uint(1, m.run_id) + _text(2, m.message_id) + uint(3, m.src_node_id) + uint(4, m.dst_node_id)
            + _text(5, m.reply_to_message_id) + _text(6, m.group_id) + (9 if m.ttl else 0)
            + _text(8, m.message_type) + (9 if m.created_at else 0)
            + sum(1 + _varint(v) for v in (m.src_task_id, m.dst_task_id) if v is not None))
    return _field(1, meta) + _field(2, content)


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


def test_serialized_nbytes_is_the_protobuf_wire_size_counted_by_hand():
    t = {"big": torch.randn(512, 256), "b": torch.randn(256), "scalar": torch.tensor(2.0),
         "rows": torch.arange(5, dtype=torch.int32), "none": torch.zeros(0, 3)}
    rec = encode(t, "float32")
    assert payload_nbytes(rec) == 4 * (512 * 256 + 256 + 1) + 4 * 5
    # "big", spelled out: an Item (tag, 3-byte length) holding the key (1+1+3) and the Array (tag, 3-byte length):
    # dtype (1+1+7), shape (tag, length, 512 and 256 as 2-byte varints), stype (1+1+10), data (1+3+524288).
    assert array_record_bytes({"big": t["big"]}) == 1 + 3 + (5 + 1 + 3 + (9 + 6 + 12 + 524292))
    assert serialized_nbytes(rec) == array_record_bytes(t)
    metrics = {"num-examples": 10.0, "partition-id": 3}
    rd = RecordDict({"delta": rec, "metrics": MetricRecord(metrics)})
    assert serialized_nbytes(rd) == record_dict_bytes({"delta": (2, array_record_bytes(t)),
                                                      "metrics": (3, metric_record_bytes(metrics))})


def test_serialized_nbytes_of_message_counts_metadata_and_content(task_identity):
    w = {"w": torch.randn(64, 32)}
    rd = RecordDict({"delta": encode(w, "float32")})
    msg = Message(content=rd, dst_node_id=7, message_type="train")
    content = record_dict_bytes({"delta": (2, array_record_bytes(w))})
    assert serialized_nbytes(msg) == message_bytes(msg.metadata, content)
    assert serialized_nbytes(msg) > serialized_nbytes(rd) > 4 * 64 * 32  # metadata and framing on top of the data


def test_a_packed_record_is_two_arrays_counted_by_hand_and_decodes_bit_exact(tensors):
    t = {**tensors, "rows": torch.arange(5, dtype=torch.int64)}
    for codec in CODECS:
        rec = encode(t, codec)
        packed = pack(rec)
        assert list(packed.keys()) == [PACKED, INDEX]  # one object for the tensors, whatever their number
        assert payload_nbytes(packed) == payload_nbytes(rec)  # the index is framing, not payload
        assert list(unpack(packed).keys()) == list(rec.keys())
        out, ref = decode(packed), decode(rec)
        assert list(out) == list(ref) and all(torch.equal(out[k], ref[k]) for k in ref), codec
    assert serialized_nbytes(pack(encode(t, "float32"))) == packed_record_bytes(t)
    assert unpack(rec) is rec  # a record that is not packed passes through


@pytest.mark.parametrize("spoil, error", [
    (lambda p: p.__setitem__(INDEX, encode({"x": torch.zeros(2)})["x"]), "unreadable index"),  # not JSON
    (lambda p: p.__setitem__("extra", encode({"x": torch.zeros(2)})["x"]), "holds exactly"),
    (lambda p: p.pop(INDEX), "holds exactly"),
])
def test_a_malformed_packed_record_is_a_clear_value_error(tensors, spoil, error):
    packed = pack(encode(tensors))
    spoil(packed)
    with pytest.raises(ValueError, match=error):
        decode(packed)


def test_a_packed_index_that_does_not_add_up_is_refused(tensors):
    def repacked(index):
        meta = json.dumps(index).encode()
        out = pack(encode(tensors))
        out[INDEX] = type(out[INDEX])(dtype="uint8", shape=(len(meta),), stype="fedfar.raw", data=meta)
        return out
    index = json.loads(bytes(pack(encode(tensors))[INDEX].data))
    short = [*index[:-1], [*index[-1][:4], index[-1][4] + 4]]  # claims 4 bytes more than there are
    with pytest.raises(ValueError, match="accounts for"):
        decode(repacked(short))
    with pytest.raises(ValueError, match="twice"):
        decode(repacked([*index, [index[0][0], "float32", [0], "fedfar.raw", 0]]))
    with pytest.raises(ValueError, match="unreadable"):
        decode(repacked([["x", "float32"]]))


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
    g = torch.Generator().manual_seed(2)
    old = {"w": torch.randn(8, 4, generator=g)}
    new = {"w": old["w"] + 0.01 * torch.randn(8, 4, generator=g)}
    delta = state_delta(new, old)
    rebuilt = apply_delta(old, decode(encode(delta, "int8")))
    # The documented int8 bound, per row: half a quantisation step, max|row| / 254, plus the float32 rounding of
    # old + decoded delta (two ulps of the result at most; far below the bound, but not zero).
    bound = delta["w"].abs().amax(dim=1, keepdim=True) / 254 + 2.0**-22 * new["w"].abs()
    ratio = (rebuilt["w"] - new["w"]).abs() / bound
    assert ratio.max() <= 1, ratio.max()
    assert ratio.max() > 0.5  # with this seed some element uses most of the bound: int8 really ran


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
