"""FAR core: split equals original, gradients, training equivalence, freezing, merge, selection, policies."""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, tiny_batch, tiny_model
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook
from transformers import AutoModelForSequenceClassification

from fedfar.methods import FAR, Full, RandomSelection, apply_bitfit, get_policy, parse_method
from fedfar.methods.far import (
    SplitFFN,
    ffn_sizes,
    ffn_weights,
    learner_indices,
    merge,
    node_scores,
    random_learners,
    reconfigure,
    select_learners,
)
from fedfar.methods.far.layer import _joined, activation_kind
from fedfar.train import TrainConfig, carry_optimizer_state, make_optimizer, train


@pytest.mark.parametrize("model_type", sorted(TINY))
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "recompute"])
def test_split_model_gives_the_original_output(model_type, storage):
    model = tiny_model(model_type).eval()
    batch = tiny_batch()
    ref = model(**batch).logits
    reconfigure(model, random_learners(ffn_sizes(model), 0.3, seed=1), get_policy("paper"), storage)
    assert sum(isinstance(m, SplitFFN) for m in model.modules()) == 2
    torch.testing.assert_close(model(**batch).logits, ref, rtol=1e-5, atol=1e-6)


def _naive_ffn(x, w1, b1, w2, b2, learners, act=F.gelu):
    """The reference: ordinary autograd over the same split (learner rows trainable)."""
    frozen = torch.tensor([i for i in range(w1.shape[0]) if i not in set(learners.tolist())])
    w1l = w1[learners].clone().requires_grad_()
    b1l = b1[learners].clone().requires_grad_()
    w2l = w2[:, learners].clone().requires_grad_()
    y = F.linear(act(F.linear(x, w1l, b1l)), w2l, b2) + F.linear(act(F.linear(x, w1[frozen], b1[frozen])), w2[:, frozen])
    return y, (w1l, b1l, w2l)


@pytest.mark.parametrize("storage,tol", [("float32", 1e-5), ("recompute", 1e-5), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU()])
def test_split_ffn_gradients_match_autograd(storage, tol, act):
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 24), nn.Linear(24, 8)
    learners = torch.tensor([1, 5, 6, 20])
    split = SplitFFN(fc1, fc2, act, learners, storage)
    x = torch.randn(3, 5, 8, requires_grad=True)
    g = torch.randn(3, 5, 8)
    split(x).backward(g)

    x_ref = x.detach().clone().requires_grad_()
    b2 = fc2.bias.detach().clone().requires_grad_()
    y, (w1l, b1l, w2l) = _naive_ffn(x_ref, fc1.weight.detach(), fc1.bias.detach(), fc2.weight.detach(), b2, learners, act)
    y.backward(g)
    # Weight gradients never touch the narrow copy: exact to float tolerance in every storage mode.
    for ours, ref in [(split.w1_learner, w1l), (split.b1_learner, b1l), (split.w2_learner, w2l), (split.b2, b2)]:
        torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)
    assert split.w1_frozen.grad is None and not split.w1_frozen.requires_grad


def test_activation_kinds_are_recognised_by_value():
    from transformers.activations import ACT2FN

    assert activation_kind(ACT2FN["gelu"]) == "gelu"
    assert activation_kind(ACT2FN["gelu_pytorch_tanh"]) == "gelu_tanh"
    assert activation_kind(ACT2FN["relu"]) == "relu"
    assert activation_kind(ACT2FN["silu"]) == "generic"


def test_far_at_full_retention_trains_like_full_finetuning():
    batch = tiny_batch()
    full, far = tiny_model(), tiny_model()
    reconfigure(far, [torch.arange(d) for d in ffn_sizes(far)], get_policy("paper"), "float32")
    for model in (full, far):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        model(**batch).loss.backward()
        opt.step()
    merge(far)
    for (name, p), (_, q) in zip(full.state_dict().items(), far.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_frozen_weights_are_bit_identical_after_training():
    model = tiny_model(dropout=True)
    reconfigure(model, random_learners(ffn_sizes(model), 0.25, seed=0), get_policy("frozen-embeddings"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert any("w1_frozen" in n for n in frozen) and any("word_embeddings" in n for n in frozen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for seed in range(3):
        model(**tiny_batch(seed=seed)).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert all(not torch.equal(dict(model.named_parameters())[n], v) for n, v in trainable.items())


def test_merge_then_reload_with_plain_transformers(tmp_path):
    model = tiny_model("distilbert")
    reconfigure(model, random_learners(ffn_sizes(model), 0.1, seed=0), get_policy("paper"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**tiny_batch()).loss.backward()
    opt.step()
    model.eval()
    batch = tiny_batch(seed=5)
    before = model(**batch).logits
    merge(model)
    assert not any(isinstance(m, SplitFFN) for m in model.modules())
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**batch).logits, before, rtol=1e-5, atol=1e-6)
    assert set(reloaded.state_dict()) == set(tiny_model("distilbert").state_dict())


def test_selection_matches_a_hand_computed_l1_ranking():
    w1 = torch.zeros(5, 2)
    b1 = torch.zeros(5)
    w2 = torch.zeros(3, 5)
    w1b, b1b, w2b = w1.clone(), b1.clone(), w2.clone()
    w1b[0] = torch.tensor([0.5, -0.5])  # node 0: |0.5|+|-0.5| = 1.0
    b1b[1] = -3.0                        # node 1: 3.0
    w2b[:, 2] = torch.tensor([1.0, 1.0, 0.5])  # node 2: 2.5
    w1b[3] = torch.tensor([0.1, 0.0])
    w2b[0, 3] = -0.1                     # node 3: 0.2
    scores = node_scores([(w1, b1, w2)], [(w1b, b1b, w2b)])
    torch.testing.assert_close(scores[0], torch.tensor([1.0, 3.0, 2.5, 0.2, 0.0]))
    assert select_learners(scores, 0.4)[0].tolist() == [1, 2]   # round(0.4 * 5) = 2 learners
    assert select_learners(scores, 0.6)[0].tolist() == [0, 1, 2]
    assert select_learners(scores, 0.01)[0].tolist() == [1]     # at least one learner per block


def test_priming_then_reconfigure_selects_by_movement_and_keeps_schedule():
    model = tiny_model()
    batches = [tiny_batch(seed=s) for s in range(10)]
    # The learning rate and optimizer of every real step, read as the optimizer steps (a torch hook, no mock).
    seen = []
    hook = register_optimizer_step_pre_hook(lambda opt, *_: seen.append((id(opt), opt.param_groups[0]["lr"])))
    cfg = TrainConfig(lr=1e-2, warmup_share=0.3, priming_share=0.2)
    spec = FAR(retention=0.25, policy="paper")
    try:
        out = train(model, batches, spec, epochs=1, cfg=cfg)
    finally:
        hook.remove()
    assert out["priming_steps"] == 2 and out["steps"] == 10
    assert [x.numel() for x in learner_indices(model)] == [16, 16]  # round(0.25 * 64)
    assert all(torch.equal(a, b) for a, b in zip(out["learners"], learner_indices(model)))
    # Warm-up over 3 steps straddles the reconfigure after step 2, then linear decay to 0 over the other 7 steps.
    # The schedule goes on across the rebuilt optimizer: restarting it would show 1e-2 / 3 again at step 2.
    want = [1e-2 * 1 / 3, 1e-2 * 2 / 3, 1e-2, *(1e-2 * (10 - s) / 7 for s in range(3, 10))]
    assert [lr for _, lr in seen] == pytest.approx(want, rel=1e-12, abs=0)
    optimizers = [o for o, _ in seen]
    assert optimizers[0] == optimizers[1] != optimizers[2] and len(set(optimizers[2:])) == 1  # rebuilt once


def test_learners_are_the_nodes_that_moved_most_in_priming():
    model = tiny_model()
    before = ffn_weights(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(**tiny_batch()).loss.backward()
    opt.step()
    scores = node_scores(before, ffn_weights(model))
    learners = select_learners(scores, 0.25)
    for s, idx in zip(scores, learners):
        others = torch.ones_like(s, dtype=torch.bool)
        others[idx] = False
        assert s[idx].min() >= s[others].max()


def test_optimizer_moments_of_learner_rows_carry_across_reconfigure():
    model = tiny_model()
    opt = make_optimizer(model, TrainConfig())
    model(**tiny_batch()).loss.backward()
    opt.step()
    fc1 = model.bert.encoder.layer[0].intermediate.dense
    old_avg = opt.state[fc1.weight]["exp_avg"].clone()
    learners = random_learners(ffn_sizes(model), 0.25, seed=0)
    origin = reconfigure(model, learners, get_policy("paper"))
    new = make_optimizer(model, TrainConfig())
    carry_optimizer_state(opt, new, origin)
    split = model.bert.encoder.layer[0].intermediate.dense
    assert torch.equal(new.state[split.w1_learner]["exp_avg"], old_avg[learners[0]])
    assert split.w1_frozen not in new.state
    assert len(new.state) == len([p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("name", ["paper", "frozen-embeddings", "frozen-attention"])
def test_policies_set_exactly_the_documented_tensors(name):
    model = tiny_model()
    reconfigure(model, random_learners(ffn_sizes(model), 0.1, seed=0), get_policy(name))
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(("learner" in n or n.endswith("intermediate.dense.b2")) for n in trains if "intermediate.dense" in n)
    assert not any("_frozen" in n for n in trains)
    assert ("bert.embeddings.word_embeddings.weight" in trains) == (name == "paper")
    assert ("bert.encoder.layer.0.attention.self.query.weight" in trains) == (name != "frozen-attention")
    assert "bert.encoder.layer.0.attention.output.LayerNorm.weight" in trains
    assert ("bert.embeddings.LayerNorm.weight" in trains) == (name == "paper")  # part of the embeddings module
    assert {"classifier.weight", "bert.pooler.dense.weight"} <= trains


def test_bitfit_trains_biases_and_head_only():
    model = tiny_model()
    apply_bitfit(model)
    for n, p in model.named_parameters():
        assert p.requires_grad == (n.endswith("bias") or n.startswith("classifier")), n


def test_unsupported_family_names_the_supported_ones():
    from transformers import GPT2Config, GPT2ForSequenceClassification

    model = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="distilbert.*roberta"):
        reconfigure(model, [torch.tensor([0])], get_policy("paper"))


def test_method_spec_parsing_and_errors():
    assert parse_method("far10-emb") == FAR(retention=0.1, policy="frozen-embeddings")
    assert parse_method("random40") == RandomSelection(retention=0.4, policy="paper")
    assert parse_method("far10-attn").label == "far10-attn"
    assert parse_method("bitfit").name == "bitfit"
    with pytest.raises(ValueError, match="far<retention"):
        parse_method("prefix8")
    with pytest.raises(ValueError, match="freeze policy"):
        FAR(retention=0.1, policy="frozen-everything")
    with pytest.raises(ValueError, match="retention"):
        FAR(retention=1.5)


def test_reconfigure_validates_learner_lists(model):
    with pytest.raises(ValueError, match="2"):
        reconfigure(copy.deepcopy(model), [torch.tensor([0])], get_policy("paper"))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        reconfigure(model, [torch.tensor([64]), torch.tensor([0])], get_policy("paper"))


def test_folded_dropout_matches_a_regenerated_mask_and_its_gradient():
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(8, 24), nn.Linear(24, 8)
    split = SplitFFN(fc1, fc2, nn.GELU(), torch.tensor([0, 3]), "float32", dropout=0.5).train()
    x = torch.randn(4, 8, requires_grad=True)
    y = split(x)
    split.eval()
    clean = split(x)
    kept = y != 0
    # Every output is either dropped or the clean value scaled by 1/(1-p); about half are dropped.
    torch.testing.assert_close(y[kept], 2 * clean[kept])
    assert 0.25 < kept.float().mean() < 0.75
    y.sum().backward()
    g_masked = x.grad.clone()
    x.grad = None
    (clean * kept * 2.0).sum().backward()
    torch.testing.assert_close(g_masked, x.grad)


def test_dropout_goes_back_on_merge():
    model = tiny_model(dropout=True)
    reconfigure(model, random_learners(ffn_sizes(model), 0.5, seed=0), get_policy("paper"))
    assert isinstance(model.bert.encoder.layer[0].output.dropout, nn.Identity)
    merge(model)
    assert model.bert.encoder.layer[0].output.dropout.p == model.config.hidden_dropout_prob


def test_full_finetuning_under_a_policy_freezes_outside_the_ffn_only():
    spec = parse_method("full-emb")
    assert spec == Full(policy="frozen-embeddings") and spec.label == "full-emb"
    model = tiny_model()
    train(model, [tiny_batch()], spec, epochs=1, cfg=TrainConfig())
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "bert.embeddings.word_embeddings.weight" not in trains
    assert "bert.encoder.layer.0.intermediate.dense.weight" in trains
    with pytest.raises(ValueError, match="bitfit"):
        parse_method("bitfit-emb")


def test_split_branches_share_one_storage_and_a_copied_layer_computes_the_same():
    torch.manual_seed(0)
    split = SplitFFN(nn.Linear(8, 24), nn.Linear(24, 8), nn.GELU(), torch.tensor([0, 3, 7]), "bfloat16")
    # Learners first, then frozen nodes, in one storage: the full-width matmul needs no copy of the weights.
    assert _joined(split.w1_learner, split.w1_frozen, 0).data_ptr() == split.w1_learner.data_ptr()
    assert _joined(split.w2_learner, split.w2_frozen, 1).data_ptr() == split.w2_learner.data_ptr()
    copied = copy.deepcopy(split)  # a deepcopy (or .to()) gives every parameter its own storage
    assert copied.w1_frozen.untyped_storage().data_ptr() != copied.w1_learner.untyped_storage().data_ptr()
    x = torch.randn(5, 8, requires_grad=True)
    outputs, grads = [], []
    for layer in (split, copied):
        y = layer(x)
        y.pow(2).sum().backward()
        outputs.append(y.detach())
        grads.append([x.grad.clone(), layer.w1_learner.grad, layer.w2_learner.grad, layer.b1_learner.grad])
        x.grad = None
    assert torch.equal(outputs[0], outputs[1])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# ------------------------------------------------------------------ the split FFN against a stock FFN, exactly
def _stock_and_split(storage, act, learners, d_in=6, d_ff=16, d_out=5, bias1=True, bias2=True, dtype=torch.float64,
                     dropout=0.0):
    """A stock (fc1, fc2) pair and a SplitFFN cut from a copy of it (the split keeps fc2's very bias Parameter)."""
    torch.manual_seed(0)
    fc1 = nn.Linear(d_in, d_ff, bias=bias1, dtype=dtype)
    fc2 = nn.Linear(d_ff, d_out, bias=bias2, dtype=dtype)
    split = SplitFFN(copy.deepcopy(fc1), copy.deepcopy(fc2), act, learners, storage, dropout=dropout)
    return fc1, fc2, split


_ACTS = [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU()]


@pytest.mark.parametrize("x_needs_grad", [True, False], ids=["input-grad", "no-input-grad"])
@pytest.mark.parametrize("act", _ACTS, ids=["gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "recompute"])
def test_float64_split_ffn_output_and_gradients_equal_the_stock_ffn(storage, act, x_needs_grad):
    # float64 end to end: no float32 scratch tensor may creep in (exact to 1e-12, bfloat16's input gradient aside).
    learners = torch.tensor([0, 4, 9, 15])
    fc1, fc2, split = _stock_and_split(storage, act, learners)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=x_needs_grad)
    g = torch.randn(2, 3, 5, dtype=torch.float64)
    x_ref = x.detach().clone().requires_grad_(x_needs_grad)
    y_ref = fc2(act(fc1(x_ref)))
    y_ref.backward(g)
    y = split(x)
    y.backward(g)
    assert y.dtype == torch.float64 and y.shape == (2, 3, 5)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for ours, ref in [(split.w1_learner, fc1.weight.grad[learners]), (split.b1_learner, fc1.bias.grad[learners]),
                      (split.w2_learner, fc2.weight.grad[:, learners]), (split.b2, fc2.bias.grad)]:
        assert ours.grad.dtype == torch.float64
        torch.testing.assert_close(ours.grad, ref, rtol=1e-12, atol=1e-12)
    if x_needs_grad:
        tol = 2e-2 if storage == "bfloat16" else 1e-12
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=tol, atol=tol)
    else:
        assert x.grad is None


@pytest.mark.parametrize("frozen", [("w1_learner",), ("b1_learner",), ("w2_learner",), ("b2",),
                                    ("w1_learner", "b1_learner", "w2_learner", "b2")],
                         ids=["w1", "b1", "w2", "b2", "all-weights"])
@pytest.mark.parametrize("storage", ["float32", "recompute"])
def test_split_ffn_gives_gradients_to_exactly_the_tensors_that_need_them(frozen, storage):
    # Any learner tensor can be switched off (a bias-free variant, an input-attribution pass over a frozen model):
    # it gets no gradient and every other tensor, the input included, still gets the stock one.
    learners = torch.tensor([1, 2, 7, 11])
    fc1, fc2, split = _stock_and_split(storage, nn.GELU(), learners)
    for name in frozen:
        getattr(split, name).requires_grad_(False)
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    g = torch.randn(7, 5, dtype=torch.float64)
    fc2(F.gelu(fc1(x_ref))).backward(g)
    split(x).backward(g)
    refs = {"w1_learner": fc1.weight.grad[learners], "b1_learner": fc1.bias.grad[learners],
            "w2_learner": fc2.weight.grad[:, learners], "b2": fc2.bias.grad}
    for name, ref in refs.items():
        grad = getattr(split, name).grad
        if name in frozen:
            assert grad is None, name
        else:
            torch.testing.assert_close(grad, ref, rtol=1e-12, atol=1e-12, msg=name)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


def test_relu_derivative_at_exactly_zero_is_zero_as_in_stock_autograd():
    # A zero-initialised node has pre-activation exactly 0 for every token; ReLU'(0) = 0 in PyTorch, so such a
    # node must get no gradient from the split layer either.
    learners = torch.tensor([3, 8])
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(6, 12, dtype=torch.float64), nn.Linear(12, 5, dtype=torch.float64)
    with torch.no_grad():
        fc1.weight[[3, 5]] = 0.0  # node 3 a learner, node 5 frozen
        fc1.bias[[3, 5]] = 0.0
    split = SplitFFN(copy.deepcopy(fc1), copy.deepcopy(fc2), nn.ReLU(), learners, "float32")
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    fc2(F.relu(fc1(x_ref))).sum().backward()
    split(x).sum().backward()
    assert split.b1_learner.grad[0] == 0.0 and not split.w1_learner.grad[0].any()
    torch.testing.assert_close(split.b1_learner.grad, fc1.bias.grad[learners], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split.w1_learner.grad, fc1.weight.grad[learners], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias1,bias2", [(True, True), (False, True), (True, False), (False, False)])
def test_merge_gives_back_the_original_layers_bit_for_bit_with_or_without_biases(bias1, bias2):
    fc1, fc2, split = _stock_and_split("recompute", nn.GELU(), torch.tensor([2, 3, 13]), bias1=bias1, bias2=bias2)
    x = torch.randn(4, 6, dtype=torch.float64)
    torch.testing.assert_close(split(x), fc2(F.gelu(fc1(x))), rtol=1e-12, atol=1e-12)
    # A bias the stock layer lacked is not trained: b2 trains exactly when fc2 had a bias.
    assert split.b2.requires_grad == bias2
    m1, m2 = split.merge()
    for merged, stock in ((m1, fc1), (m2, fc2)):
        assert isinstance(merged, nn.Linear) and merged.weight.dtype == torch.float64
        assert merged.state_dict().keys() == stock.state_dict().keys()
        for name, value in stock.state_dict().items():
            assert torch.equal(merged.state_dict()[name], value), name


@pytest.mark.parametrize("bias1,bias2", [(True, False), (False, True), (False, False)])
def test_a_bias_free_ffn_trains_and_merges_back_to_what_it_computed(bias1, bias2):
    # A missing bias is zeros that stay zeros: it must neither train nor be dropped with what it learned.
    _, _, split = _stock_and_split("bfloat16", nn.GELU(), torch.tensor([0, 5]), bias1=bias1, bias2=bias2)
    opt = torch.optim.SGD([p for p in split.parameters() if p.requires_grad], lr=0.5)
    x = torch.randn(4, 6, dtype=torch.float64)
    split(x).pow(2).sum().backward()
    opt.step()
    m1, m2 = split.merge()
    assert (m1.bias is None) == (not bias1) and (m2.bias is None) == (not bias2)
    torch.testing.assert_close(m2(F.gelu(m1(x))), split(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("storage", ["float32", "bfloat16", "recompute"])
def test_everything_the_split_creates_lives_on_the_device_of_its_weights(storage):
    # The meta device stands in for a GPU (a model reconfigured on the GPU mid-training): any scratch or index
    # tensor left on the CPU shows, and copying out of a meta tensor fails outright.
    fc1, fc2 = nn.Linear(8, 24, device="meta"), nn.Linear(24, 8, device="meta")
    split = SplitFFN(fc1, fc2, nn.GELU(), torch.tensor([1, 5, 6]), storage)
    assert {t.device.type for t in [*split.parameters(), *split.buffers()]} == {"meta"}
    x = torch.empty(3, 8, device="meta", requires_grad=True)
    split(x).sum().backward()
    assert x.grad.device.type == "meta" and split.w1_learner.grad.device.type == "meta"
    m1, m2 = split.merge()
    assert {t.device.type for t in [*m1.parameters(), *m2.parameters()]} == {"meta"}


def test_split_ffn_defaults_and_argument_checks():
    fc1, fc2 = nn.Linear(4, 10), nn.Linear(10, 4)
    assert SplitFFN(fc1, fc2, nn.GELU(), [1]).preact_storage == "bfloat16"  # the memory-saving default
    with pytest.raises(ValueError) as err:
        SplitFFN(fc1, fc2, nn.GELU(), [1], "float16")
    assert str(err.value) == "preact_storage 'float16': choose one of ('float32', 'bfloat16', 'recompute')"
    with pytest.raises(ValueError) as err:
        SplitFFN(fc1, fc2, nn.GELU(), [-1, 3])
    assert str(err.value) == "learner indices must lie in [0, 10), got -1..3"
    # Indices of any integer type, unsorted, repeated: kept sorted, unique and int64 like every index tensor.
    split = SplitFFN(fc1, fc2, nn.GELU(), torch.tensor([7, 1, 3, 7], dtype=torch.int32))
    assert split.learner_index.dtype == split.frozen_index.dtype == torch.long
    assert split.learner_index.tolist() == [1, 3, 7]
    assert split.frozen_index.tolist() == [0, 2, 4, 5, 6, 8, 9]


def test_split_ffn_without_dropout_draws_no_random_numbers():
    # Evaluation (and a block without dropout) must not move the global RNG: later draws stay reproducible.
    _, _, split = _stock_and_split("recompute", nn.GELU(), torch.tensor([1, 2]), dtype=torch.float32, dropout=0.1)
    x = torch.randn(5, 6, requires_grad=True)
    for layer in (split.eval(), _stock_and_split("recompute", nn.GELU(), torch.tensor([1]), dtype=torch.float32)[2]):
        state = torch.get_rng_state()
        layer(x).sum().backward()
        assert torch.equal(torch.get_rng_state(), state)


def test_folded_dropout_keeps_an_element_exactly_when_its_uniform_draw_is_at_least_p():
    # The mask is `torch.rand_like(y) >= p` on the global generator: reproducible from the seed, boundary included
    # (p is set to one of the very uniforms drawn, so one element sits exactly on it and must be kept).
    _, _, split = _stock_and_split("float32", nn.GELU(), torch.tensor([0, 3]), dtype=torch.float32)
    x = torch.randn(40, 6)
    clean = split(x).detach()
    torch.manual_seed(123)
    u = torch.rand(40, 5)
    p = u.flatten().median().item()
    split.dropout = p
    split.train()
    torch.manual_seed(123)
    y = split(x).detach()
    keep = u >= p
    assert (u == p).sum() == 1 and keep.sum() == 101  # the median (100th smallest of 200) and the 100 above it
    assert torch.equal(y != 0, keep)
    torch.testing.assert_close(y[keep], clean[keep] / (1 - p))


@pytest.mark.parametrize("relayout", [copy.deepcopy, lambda m: m.to(torch.float64).to(torch.float32)],
                         ids=["deepcopy", "to"])
def test_a_layer_with_no_learners_computes_the_stock_ffn_also_after_a_copy(relayout):
    # Everything frozen: the empty learner slices must not be mistaken for the start of the frozen ones.
    fc1, fc2, split = _stock_and_split("recompute", nn.GELU(), torch.tensor([], dtype=torch.long),
                                       dtype=torch.float32)
    x = torch.randn(3, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ref = fc2(F.gelu(fc1(x_ref)))
    ref.sum().backward()
    for layer in (split, relayout(split)):
        y = layer(x)
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
        y.sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
        x.grad = None


# ------------------------------------------------------------------------------------------ the whole model
def test_node_scores_measure_movement_from_nonzero_weights():
    w1, b1, w2 = torch.full((3, 2), 1.0), torch.tensor([2.0, -1.0, 0.5]), torch.full((2, 3), -1.0)
    w1b, b1b, w2b = w1.clone(), torch.tensor([1.5, -1.0, 0.5]), w2.clone()
    w1b[2, 1] = 0.0   # node 2: |0 - 1| = 1
    w2b[0, 1] = -1.25  # node 1: 0.25
    scores = node_scores([(w1, b1, w2)], [(w1b, b1b, w2b)])   # node 0: |1.5 - 2| = 0.5
    assert scores[0].tolist() == [0.5, 0.25, 1.0]


def test_reconfiguring_again_replaces_the_split_and_keeps_the_function(model):
    batch = tiny_batch()
    model.eval()
    ref = model(**batch).logits
    original = {n: p.clone() for n, p in model.state_dict().items()}
    reconfigure(model, random_learners(ffn_sizes(model), 0.25, seed=0), get_policy("paper"))
    again = random_learners(ffn_sizes(model), 0.5, seed=1)
    reconfigure(model, again, get_policy("paper"), "recompute")
    assert all(torch.equal(a, b) for a, b in zip(learner_indices(model), again))
    torch.testing.assert_close(model(**batch).logits, ref, rtol=1e-5, atol=1e-6)
    merge(model)
    assert model.state_dict().keys() == original.keys()
    assert all(torch.equal(model.state_dict()[n], p) for n, p in original.items())


def test_merge_restores_every_split_block_wherever_it_sits(model):
    # A model whose first block is stock and whose second is split (blocks moved between models).
    batch = tiny_batch()
    model.eval()
    ref = model(**batch).logits
    donor = copy.deepcopy(model)
    reconfigure(donor, random_learners(ffn_sizes(donor), 0.25, seed=0), get_policy("paper"))
    model.bert.encoder.layer[1] = donor.bert.encoder.layer[1]
    merge(model)
    assert not any(isinstance(m, SplitFFN) for m in model.modules())
    assert set(model.state_dict()) == set(tiny_model().state_dict())
    torch.testing.assert_close(model(**batch).logits, ref, rtol=1e-5, atol=1e-6)


def test_learner_indices_of_a_stock_model_says_to_reconfigure_first(model):
    with pytest.raises(ValueError) as err:
        learner_indices(model)
    assert str(err.value) == "model is not reconfigured: call fedfar.methods.far.reconfigure first"
