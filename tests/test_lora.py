"""LoRA through PEFT as a fedfar method: strings, targets per family, what trains and travels, the merge back."""
from dataclasses import replace

import pytest
import torch
from conftest import ListLoader, tiny_batch, tiny_model
from torch import nn
from transformers import AutoModelForSequenceClassification

from fedfar.federation import exchange
from fedfar.methods import ARCHITECTURES, LoRA, parse_method
from fedfar.methods.lora import lora_modules
from fedfar.train import TrainConfig, train

QV = {"bert": ("attention.self.query", "attention.self.value"), "distilbert": ("attention.q_lin", "attention.v_lin")}


def test_lora_strings_read_back_and_bad_ones_name_the_valid_forms():
    assert parse_method("lora8") == LoRA(rank=8, targets="qv")
    assert parse_method("lora16-all") == LoRA(rank=16, targets="all")
    for text in ("lora8", "lora16-all"):
        assert parse_method(parse_method(text).label).label == text
    for bad, names in [("lora", "lora8"), ("lora0", ">= 1"), ("lora8.5", "whole number"),
                       ("lora8-emb", "lora8-all")]:
        with pytest.raises(ValueError, match=names) as err:
            parse_method(bad)
        assert "lora<rank>[-all]" in str(err.value)
    with pytest.raises(ValueError, match="alpha"):
        LoRA(alpha=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRA(dropout=1.0)


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "electra"])
def test_adapters_sit_on_query_and_value_or_on_every_encoder_linear(family):
    base = "transformer.layer" if family == "distilbert" else "encoder.layer"
    prefix = f"{tiny_model(family).base_model_prefix}.{base}"
    q, v = QV.get(family, QV["bert"])
    model = LoRA(rank=4).attach(tiny_model(family))
    assert sorted(lora_modules(model)) == sorted(f"{prefix}.{i}.{p}" for i in range(2) for p in (q, v))
    model = LoRA(rank=4, targets="all").attach(tiny_model(family))
    encoder_linears = {n for n, m in tiny_model(family).named_modules()
                       if isinstance(m, nn.Linear) and n.startswith(prefix)}
    assert set(lora_modules(model)) == encoder_linears and len(encoder_linears) == 2 * 6


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_an_attached_model_computes_exactly_what_the_pretrained_did(family):
    batch = {k: v for k, v in tiny_batch().items() if k != "labels"}
    plain = tiny_model(family).eval()
    lora = LoRA(rank=4, targets="all").attach(tiny_model(family)).eval()  # B starts at zero
    assert torch.equal(plain(**batch).logits, lora(**batch).logits)


def test_attach_draws_from_its_seed_and_leaves_the_callers_random_stream_alone():
    def a_weights(seed):
        return [m.lora_A["default"].weight for m in lora_modules(LoRA().attach(tiny_model(), seed)).values()]

    assert all(torch.equal(x, y) for x, y in zip(a_weights(0), a_weights(0)))
    assert not any(torch.equal(x, y) for x, y in zip(a_weights(0), a_weights(1)))
    model = tiny_model()
    torch.manual_seed(5)
    LoRA().attach(model, seed=3)
    assert torch.equal(torch.rand(4), torch.manual_seed(5) and torch.rand(4))


def test_attaching_twice_keeps_the_first_adapters():
    model = LoRA().attach(tiny_model(), seed=0)
    first = {n: p.clone() for n, p in model.named_parameters() if ".lora_" in n}
    LoRA().attach(model, seed=1)
    now = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert first.keys() == now.keys() and all(torch.equal(first[n], now[n]) for n in first)


def test_only_the_adapters_and_the_head_train_and_travel_and_frozen_weights_stay_bit_identical():
    method = LoRA(rank=4)
    model = method.attach(tiny_model())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".lora_" in n or n.startswith("classifier.")}
    # rank x (in + out) per adapted 32 x 32 projection, 2 per block, 2 blocks; head 32 x 2 + 2
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) == 4 * 4 * (32 + 32) + 66
    plan = method.exchange_plan(model)
    assert set(plan.dense) == trainable and not plan.sliced
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    b_before = {n: p.clone() for n, p in model.named_parameters() if ".lora_B" in n}
    train(model, ListLoader([tiny_batch(seed=s) for s in range(3)]), method, 1.0, TrainConfig(lr=1e-2))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], frozen[n]) for n in frozen)
    assert all(not torch.equal(params[n], b_before[n]) for n in b_before)


def test_export_folds_each_adapter_into_its_weight_and_saves_a_plain_checkpoint(tmp_path):
    method = LoRA(rank=4, dropout=0.0)
    model = method.attach(tiny_model())
    train(model, ListLoader([tiny_batch(seed=s) for s in range(3)]), method, 1.0, TrainConfig(lr=1e-2))
    model.eval()
    batch = {k: v for k, v in tiny_batch(seed=9).items() if k != "labels"}
    logits = model(**batch).logits
    name = "bert.encoder.layer.1.attention.self.value"
    layer = lora_modules(model)[name]
    # by hand: W + (alpha / r) B A, alpha = 2r by default
    expected = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    method.export(model)
    assert not lora_modules(model) and type(model.get_submodule(name)) is nn.Linear
    assert model.state_dict().keys() == tiny_model().state_dict().keys()
    torch.testing.assert_close(model.get_submodule(name).weight, expected, rtol=0, atol=1e-6)
    model.save_pretrained(tmp_path / "model")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    torch.testing.assert_close(loaded(**batch).logits, logits, rtol=0, atol=1e-5)


def test_a_family_whose_layout_names_no_query_and_value_gets_a_clear_error(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "bert", replace(ARCHITECTURES["bert"], query=None, value=None))
    with pytest.raises(ValueError, match=r"model type 'bert'.*query= and value=.*lora<r>-all"):
        LoRA().attach(tiny_model())
    assert lora_modules(LoRA(targets="all").attach(tiny_model()))  # every linear needs no table entry


def test_a_client_update_under_lora_sends_adapter_and_head_deltas_the_server_averages():
    from fedfar.federation.client import local_update
    from fedfar.federation.config import RunConfig

    cfg = RunConfig(method="lora4", lr=1e-2, local_epochs=1)
    server = cfg.spec.attach(tiny_model(), seed=0)
    plan = cfg.spec.exchange_plan(server)
    down = exchange.select(server.state_dict(), plan, None)
    deltas = []
    for client_seed in (1, 2):
        client = cfg.spec.attach(tiny_model(), seed=7)  # its own init: the received part overwrites it
        pristine = {k: v.clone() for k, v in client.state_dict().items()}
        delta, _ = local_update(client, down, plan, None, ListLoader([tiny_batch(seed=client_seed)] * 2), cfg,
                                seed=client_seed)
        assert set(delta) == set(plan.dense)
        after = client.state_dict()
        assert all(torch.equal(after[n], pristine[n]) for n in pristine if n not in plan.dense)
        deltas.append(delta)
    state = {k: v.clone() for k, v in server.state_dict().items()}
    exchange.merge_deltas(state, [(deltas[0], 1.0), (deltas[1], 3.0)], plan)
    for n in plan.dense:
        torch.testing.assert_close(state[n], down[n] + (deltas[0][n] + 3 * deltas[1][n]) / 4)


def test_rank_is_a_whole_number_from_one_up():
    assert LoRA(rank=1).label == "lora1" and parse_method("lora1") == LoRA(rank=1)
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError) as err:
            LoRA(rank=bad)
        assert str(err.value) == f"LoRA's rank must be a whole number >= 1, e.g. lora8; got {bad!r}"


def test_an_unknown_target_names_both_valid_forms_at_the_requested_rank():
    with pytest.raises(ValueError) as err:
        LoRA(rank=4, targets="emb")
    assert str(err.value) == ("unknown LoRA target 'emb': choose lora4 (the attention query and value projections) "
                              "or lora4-all (every linear layer of the encoder blocks)")


def test_alpha_defaults_to_twice_the_rank_and_dropout_to_a_tenth_and_both_reach_the_adapters():
    layers = lora_modules(LoRA().attach(tiny_model())).values()  # lora8: alpha 16, scaling alpha / r = 2
    assert all(m.scaling["default"] == 2.0 for m in layers)
    assert all(type(m.lora_dropout["default"]) is nn.Dropout and m.lora_dropout["default"].p == 0.1 for m in layers)
    layers = lora_modules(LoRA(rank=4, alpha=0.5, dropout=0.0).attach(tiny_model())).values()  # any alpha > 0
    assert all(m.scaling["default"] == 0.125 for m in layers)
    assert all(type(m.lora_dropout["default"]) is nn.Identity for m in layers)
    with pytest.raises(ValueError) as err:
        LoRA(alpha=-1)
    assert str(err.value) == "LoRA's alpha must be > 0, got -1"


@pytest.mark.parametrize("missing", ["query", "value"])
def test_a_layout_missing_either_query_or_value_gets_the_full_instruction(monkeypatch, missing):
    monkeypatch.setitem(ARCHITECTURES, "bert", replace(ARCHITECTURES["bert"], **{missing: None}))
    with pytest.raises(ValueError) as err:
        LoRA().attach(tiny_model())
    assert str(err.value) == ("LoRA's default targets are the attention query and value projections, and the layout "
                              "of model type 'bert' names none: add query= and value= to its Layout in "
                              "fedfar.methods.arch, or use lora<r>-all")


def test_making_adapters_trainable_before_attaching_them_says_to_attach_first():
    with pytest.raises(ValueError) as err:
        LoRA(rank=4).trainable(tiny_model())
    assert str(err.value) == "lora4: the model has no adapters; attach them first (LoRA.attach)"


def test_attach_and_prepare_draw_the_adapters_from_seed_0_by_default_and_prepare_passes_its_seed_on():
    def a_weights(model):
        return [m.lora_A["default"].weight for m in lora_modules(model).values()]

    method = LoRA(rank=4)
    seed0, seed3 = a_weights(method.attach(tiny_model(), seed=0)), a_weights(method.attach(tiny_model(), seed=3))
    assert all(torch.equal(x, y) for x, y in zip(a_weights(method.attach(tiny_model())), seed0))
    model = tiny_model()
    assert method.prepare(model) == {}
    assert all(torch.equal(x, y) for x, y in zip(a_weights(model), seed0))
    model = tiny_model()
    method.prepare(model, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a_weights(model), seed3))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".lora_" in n or n.startswith("classifier.")}
