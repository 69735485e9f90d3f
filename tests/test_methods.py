"""What each fine-tuning method trains, on a tiny random model of every family in the architecture table, and what
the method strings, freeze policies and the Method interface promise a user.

Proved here:
  * `full`, `full-emb`, `full-attn`, `bitfit`, `far25-emb` and `random25-attn` train exactly their documented tensors
    (by name, and FAR's learner rows by count) on BERT, CamemBERT, DistilBERT, ELECTRA, RoBERTa and XLM-R, and every
    frozen tensor is bit-identical after an optimizer step;
  * each switch of a freeze `Policy` governs exactly its tensors (the head switch: what lies outside the base model
    plus the pooler, nothing of the encoder); FAR on a bare encoder (no task head, e.g. a sentence-embedding model)
    keeps its frozen nodes frozen; a LayerNorm swapped for a kernel library's class is still a LayerNorm to a policy;
  * an FFN without a first-layer bias plans its exchange with None in that place;
  * random selection draws its learners from seed 0 unless told otherwise, and FAR without learners says to prime
    first; preactivations are kept in bfloat16 by default;
  * `export` hands back the very model, stock layout, computing what the trained one did, ready for save_pretrained;
  * method strings: `-paper` is the default for every method, `far100` is valid, policies read in short or full
    form, and bad strings, unknown policies and unknown model families get their exact messages.
"""
import pytest
import torch
from conftest import TINY, tiny_batch
from torch import nn
from torch.nn import functional as F
from transformers import (AutoConfig, AutoModel, AutoModelForSequenceClassification, GPT2Config,
                          GPT2ForSequenceClassification)

from fedfar.methods import (ARCHITECTURES, FAR, POLICIES, BitFit, Full, LoRA, Policy, RandomSelection, apply_policy,
                            get_policy, parse_method)
from fedfar.methods.far import SplitFFN, ffn_sizes, is_reconfigured, learner_indices, random_learners

FAMILIES = sorted(ARCHITECTURES)
SIZES = {**TINY, "camembert": TINY["roberta"]}  # conftest's tiny configs, plus CamemBERT (RoBERTa's shape)
HELP = ("full[-emb|-attn], bitfit, far<retention %>[-emb|-attn], random<retention %>[-emb|-attn] or "
        "lora<rank>[-all], e.g. far10-emb or lora8")


def _model(family: str, bare: bool = False, seed: int = 0) -> nn.Module:
    """A random-weight tiny model of `family`, dropout off; `bare`: the encoder alone (AutoModel), no task head."""
    fields = dict(SIZES[family], vocab_size=100, num_labels=2, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0,
                  classifier_dropout=0.0)
    torch.manual_seed(seed)
    auto = AutoModel if bare else AutoModelForSequenceClassification
    return auto.from_config(AutoConfig.for_model(family, **fields))


def _part(name: str, prefix: str) -> str:
    """Which documented part a parameter belongs to, by its name alone. `prefix`: the base model's ('' when the
    model is the bare encoder)."""
    if prefix and not name.startswith(prefix + "."):
        return "head"  # classifier, pre-classifier, RoBERTa/ELECTRA's classification head
    rel = name[len(prefix) + 1:] if prefix else name
    if rel.startswith("pooler."):
        return "head"
    if rel.startswith(("embeddings.", "embeddings_project.")):
        return "embeddings"  # the tables, the embeddings' own LayerNorm, ELECTRA's projection to the hidden size
    if "LayerNorm" in rel or "layer_norm" in rel:
        return "layernorm"  # every LayerNorm of the blocks, BERT's inside its attention too
    if ".attention." in rel:
        return "attention"
    if ".intermediate.dense." in rel or ".output.dense." in rel or ".ffn." in rel:
        return "ffn"
    raise AssertionError(f"{name}: no documented part")


def _expected(model: nn.Module, text: str, prefix: str | None = None) -> set[str]:
    """The names `text` trains on `model` (stock layout for full/bitfit, split layout for far/random)."""
    prefix = model.base_model_prefix if prefix is None else prefix
    names = [n for n, _ in model.named_parameters()]
    if text == "bitfit":
        return {n for n in names if n.endswith("bias") or not n.startswith(prefix + ".")}
    policy = get_policy(text.split("-", 1)[1] if "-" in text else "paper")
    out = set()
    for n in names:
        part = _part(n, prefix)
        if part == "ffn":
            trains = "_frozen" not in n  # full: every FFN tensor; far/random: learner rows and b2
        else:
            trains = getattr(policy, part)
        if trains:
            out.add(n)
    return out


def _prepare(method, model: nn.Module) -> None:
    if isinstance(method, FAR):  # FAR's learners come from priming; any fixed choice will do here
        method.prepare(model, random_learners(ffn_sizes(model), method.retention, seed=5))
    else:
        method.prepare(model)


def _trains(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _step_keeps_frozen_bit_identical(model: nn.Module, loss) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss(model).backward()
    opt.step()
    params = dict(model.named_parameters())
    for n, p in params.items():
        if not p.requires_grad:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"
    assert any(not torch.equal(p, before[n]) for n, p in params.items() if p.requires_grad)


def _classification_loss(model: nn.Module) -> torch.Tensor:
    return model(**tiny_batch()).loss


def _encoder_loss(model: nn.Module) -> torch.Tensor:
    batch = tiny_batch()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return sum(t.square().mean() for t in out.values() if isinstance(t, torch.Tensor))


# ------------------------------------------------------------------------------------------ what trains, per family
@pytest.mark.parametrize("text", ["full", "full-emb", "full-attn", "bitfit", "far25-emb", "random25-attn"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_trains_exactly_its_documented_tensors_and_frozen_ones_stay_bit_identical(family, text):
    model = _model(family)
    method = parse_method(text)
    _prepare(method, model)
    assert _trains(model) == _expected(model, text)
    if method.selects_rows:
        splits = [m for m in model.modules() if isinstance(m, SplitFFN)]
        assert len(splits) == 2
        for split in splits:  # 25% of 64 nodes learn: 16 rows of W1 and b1, 16 columns of W2
            assert split.w1_learner.shape == (16, 32) and split.b1_learner.shape == (16,)
            assert split.w2_learner.shape == (32, 16) and split.w1_frozen.shape == (48, 32)
    _step_keeps_frozen_bit_identical(model, _classification_loss)


@pytest.mark.parametrize("switch", ["embeddings", "attention", "layernorm", "head"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_policy_switch_freezes_exactly_its_own_tensors(family, switch):
    model = _model(family)
    apply_policy(model, Policy(**{switch: False}))
    prefix = model.base_model_prefix
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if _part(n, prefix) == switch}
    assert frozen  # every family has something under every switch


@pytest.mark.parametrize("family", FAMILIES)
def test_far_on_a_bare_encoder_keeps_its_frozen_nodes_frozen(family):
    # A sentence-embedding model (all-MiniLM-L6-v2 is a bare BertModel) has no task head: every name lies outside
    # "bert.", so the head switch reaches the whole encoder, and the FFN must still keep FAR's own flags.
    model = _model(family, bare=True)
    method = parse_method("far25-emb")
    method.prepare(model, random_learners(ffn_sizes(model), 0.25, seed=0))
    assert _trains(model) == _expected(model, "far25-emb", prefix="")
    assert not any("_frozen" in n for n in _trains(model))
    _step_keeps_frozen_bit_identical(model, _encoder_loss)


class FusedLayerNorm(nn.Module):
    """A LayerNorm of a kernel library (apex's FusedLayerNorm, Liger's LigerLayerNorm): not an nn.LayerNorm."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.weight, self.bias, self.shape, self.eps = ln.weight, ln.bias, ln.normalized_shape, ln.eps

    def forward(self, x):
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


def _swap_layernorms(model: nn.Module) -> nn.Module:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.LayerNorm):
                setattr(parent, name, FusedLayerNorm(child))
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())
    return model


@pytest.mark.parametrize("policy", ["frozen-attention", Policy(layernorm=False)], ids=["frozen-attention", "no-ln"])
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_a_layernorm_from_a_kernel_library_is_still_governed_by_the_layernorm_switch(family, policy):
    model = _swap_layernorms(_model(family))
    reference = _model(family)
    policy = get_policy(policy) if isinstance(policy, str) else policy
    apply_policy(model, policy)
    apply_policy(reference, policy)
    assert _trains(model) == _trains(reference)
    if family == "bert":  # BERT's attention owns a LayerNorm: frozen-attention must leave it training
        assert ("bert.encoder.layer.0.attention.output.LayerNorm.weight" in _trains(model)) == policy.layernorm


def test_an_ffn_without_a_first_layer_bias_travels_without_one():
    model = _model("bert")
    for block in model.bert.encoder.layer:
        dense = block.intermediate.dense
        block.intermediate.dense = nn.Linear(dense.in_features, dense.out_features, bias=False)
    plan = parse_method("far25").exchange_plan(model)
    assert plan.ffn == tuple((f"bert.encoder.layer.{i}.intermediate.dense.weight", None,
                              f"bert.encoder.layer.{i}.output.dense.weight") for i in range(2))
    assert "bert.encoder.layer.0.output.dense.bias" in plan.dense  # b2 travels whole


# ------------------------------------------------------------------------------------------ prepare and export
def test_random_selection_draws_from_seed_0_by_default_and_keeps_preactivations_in_bfloat16():
    sizes = ffn_sizes(_model("bert"))
    default, seeded = _model("bert"), _model("bert")
    parse_method("random25").prepare(default)
    parse_method("random25").prepare(seeded, seed=3)
    as_lists = lambda ts: [t.tolist() for t in ts]  # noqa: E731
    assert as_lists(learner_indices(default)) == as_lists(random_learners(sizes, 0.25, seed=0))
    assert as_lists(learner_indices(seeded)) == as_lists(random_learners(sizes, 0.25, seed=3))
    assert as_lists(learner_indices(seeded)) != as_lists(learner_indices(default))
    assert {m.preact_storage for m in default.modules() if isinstance(m, SplitFFN)} == {"bfloat16"}
    given = _model("bert")
    FAR(retention=0.25).prepare(given, [torch.arange(16), torch.arange(48, 64)])
    assert as_lists(learner_indices(given)) == [list(range(16)), list(range(48, 64))]
    assert {m.preact_storage for m in given.modules() if isinstance(m, SplitFFN)} == {"bfloat16"}


def test_far_without_learners_says_to_prime_first_and_leaves_the_model_alone():
    model = _model("distilbert")
    with pytest.raises(ValueError) as err:
        parse_method("far10-emb").prepare(model)
    assert str(err.value) == ("far10-emb needs its learner nodes: prime first (fedfar.train.train does), or pass "
                              "learners")
    assert not is_reconfigured(model) and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("text", ["full-emb", "bitfit", "far25", "random25-attn"])
def test_export_hands_back_the_stock_model_computing_what_the_trained_one_did(text, tmp_path):
    model = _model("bert")
    method = parse_method(text)
    _prepare(method, model)
    _classification_loss(model).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:  # one step, so the export has trained weights to carry
                p -= 0.5 * p.grad
    model.eval()
    batch = tiny_batch(seed=7)
    logits = model(**batch).logits
    exported = method.export(model)
    assert exported is model and not is_reconfigured(model)
    assert set(model.state_dict()) == set(_model("bert").state_dict())
    exported.save_pretrained(tmp_path)  # what the server does with the final model
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**batch).logits, logits, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ strings and policies
def test_policy_suffix_paper_spells_out_the_default_for_every_method():
    for text in ("full", "bitfit", "far10", "random40", "lora8"):
        assert parse_method(f"{text}-paper") == parse_method(text), text
    assert parse_method("bitfit-paper") == BitFit() and parse_method("lora8-paper") == LoRA(rank=8, targets="qv")


def test_far100_lets_every_node_learn():
    assert parse_method("far100") == FAR(retention=1.0) and parse_method("far100").label == "far100"
    assert parse_method("random100-emb").label == "random100-emb"
    for retention in (0.0, -0.1, 1.01):
        with pytest.raises(ValueError) as err:
            FAR(retention=retention)
        assert str(err.value) == f"retention must be in (0, 1], got {retention}"


def test_policies_read_in_short_or_full_form_anywhere():
    assert get_policy("emb") == get_policy("frozen-embeddings") == Policy(embeddings=False)
    assert get_policy("attn") == get_policy("frozen-attention") == Policy(embeddings=False, attention=False)
    assert get_policy("paper") == Policy() and set(POLICIES) == {"paper", "frozen-embeddings", "frozen-attention"}
    # Methods built in code take the short form too, and equal (and print as) the parsed string.
    assert Full(policy="emb") == parse_method("full-emb") and Full(policy="emb").policy == "frozen-embeddings"
    assert Full(policy="attn").label == "full-attn"
    assert FAR(retention=0.1, policy="attn") == parse_method("far10-attn")
    assert RandomSelection(retention=0.4, policy="emb").label == "random40-emb"


def test_an_unknown_policy_names_the_valid_ones_in_both_forms():
    valid = "choose one of paper, frozen-embeddings, frozen-attention (short forms: emb, attn)"
    with pytest.raises(ValueError) as err:
        get_policy("frozen-everything")
    assert str(err.value) == f"unknown freeze policy 'frozen-everything': {valid}"
    with pytest.raises(ValueError) as err:
        Full(policy="everything")
    assert str(err.value) == f"unknown freeze policy 'everything': {valid}"


@pytest.mark.parametrize("text, problem", [
    ("full10", "full takes no number: write full"),
    ("bitfit2", "bitfit takes no number: write bitfit"),
    ("bitfit-emb", "bitfit has its own freeze rule (biases and head train): drop the -emb/-attn suffix"),
    ("far10-everything", "unknown freeze policy 'everything': choose one of paper, frozen-embeddings, "
                         "frozen-attention (short forms: emb, attn)"),
    ("far150", "retention must be in (0, 1], got 1.5"),
])
def test_a_bad_method_string_gets_its_exact_message(text, problem):
    with pytest.raises(ValueError) as err:
        parse_method(text)
    assert str(err.value) == f"method {text!r}: {problem} (method strings: {HELP})"


def test_an_unsupported_model_names_the_supported_families_and_the_fix():
    fix = ("Supported families: bert, camembert, distilbert, electra, roberta, xlm-roberta. "
           "Add a Layout for it to fedfar.methods.arch.ARCHITECTURES.")
    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    for model, model_type in ((gpt2, "'gpt2'"), (nn.Linear(4, 4), "None")):  # None: no transformers config at all
        with pytest.raises(ValueError) as err:
            Full().trainable(model)
        assert str(err.value) == f"FAR does not know where model type {model_type} keeps its FFN blocks. {fix}"
