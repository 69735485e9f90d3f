"""Real data, real model, small: the packaged MiniLM-L6 fine-tuned on a slice of the shared CoLA files."""
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification
from conftest import mcc_by_hand

import fedfar.finetune
from fedfar.data import default_glue_dir
from fedfar.finetune import FinetuneConfig, finetune
from fedfar.models import packaged_minilm_path

pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not default_glue_dir().is_dir(), reason="shared GLUE files not found")]


def _ffn(layer: int) -> tuple[str, str, str]:
    p = f"bert.encoder.layer.{layer}"
    return f"{p}.intermediate.dense.weight", f"{p}.intermediate.dense.bias", f"{p}.output.dense.weight"


def test_far_finetune_on_cola_writes_an_ordinary_checkpoint_with_frozen_rows_untouched(tmp_path, monkeypatch):
    # Spies around the real training and evaluation, which run unchanged: the FFN weights right after the one
    # priming step (step 0), the learners chosen, and the dev-set logits the reported metric came from.
    primed, chosen, evaluated = {}, [], []
    real_train, real_predict = fedfar.finetune.train, fedfar.finetune.predict

    def spy_train(model, loader, method, epochs, cfg, on_step=None, **kw):
        def step(i, loss):
            if i == 0:
                primed.update({k: v.detach().clone() for k, v in model.state_dict().items()
                               if any(k in _ffn(layer) for layer in range(6))})
            on_step(i, loss)
        result = real_train(model, loader, method, epochs, cfg, on_step=step, **kw)
        chosen.extend(result["learners"])
        return result

    def spy_predict(model, loader):
        evaluated.append(real_predict(model, loader))
        return evaluated[-1]

    monkeypatch.setattr(fedfar.finetune, "train", spy_train)
    monkeypatch.setattr(fedfar.finetune, "predict", spy_predict)
    out = tmp_path / "run"
    summary = finetune(FinetuneConfig(task="cola", model="minilm", method="far10-emb", epochs=1, batch_size=16,
                                      max_train_examples=64, max_length=48, out=str(out)), progress=False)
    assert summary["steps"] == 4 and summary["priming_steps"] == 1
    # The reported MCC is that of the evaluated predictions over the whole dev set, counted by hand.
    (logits, labels), = evaluated  # one epoch, one evaluation
    assert len(labels) == 1043 and logits.shape == (1043, 2)
    assert summary["final"]["mcc"] == pytest.approx(mcc_by_hand(logits.argmax(1), labels), abs=1e-12)
    assert json.loads((out / "config.json").read_text())["method"] == "far10-emb"
    assert json.loads((out / "metrics.json").read_text())["history"][0] == summary["final"]

    tuned = AutoModelForSequenceClassification.from_pretrained(out / "model").state_dict()
    base = AutoModelForSequenceClassification.from_pretrained(packaged_minilm_path(), num_labels=2).state_dict()
    # Embeddings are frozen under far10-emb, during priming too: bit-identical to the packaged checkpoint.
    assert torch.equal(tuned["bert.embeddings.word_embeddings.weight"], base["bert.embeddings.word_embeddings.weight"])
    assert not torch.equal(tuned["bert.encoder.layer.0.attention.self.query.weight"],
                           base["bert.encoder.layer.0.attention.self.query.weight"])
    # Priming trains every FFN node; after it, only the learners train. The frozen nodes' rows of W1 and b1 and
    # columns of W2 in the saved checkpoint are bit-identical to the primed weights, and the learners' rows all
    # moved: the rows that changed after priming are exactly the learners, in every block.
    assert len(chosen) == 6
    for layer, learners in enumerate(chosen):
        w1, b1, w2 = _ffn(layer)
        assert learners.numel() == round(0.1 * 1536) and not torch.equal(primed[w1], base[w1])
        frozen = torch.ones(1536, dtype=torch.bool)
        frozen[learners] = False
        assert torch.equal(tuned[w1][frozen], primed[w1][frozen]), w1
        assert torch.equal(tuned[b1][frozen], primed[b1][frozen]), b1
        assert torch.equal(tuned[w2][:, frozen], primed[w2][:, frozen]), w2
        assert torch.equal((tuned[w1] != primed[w1]).any(1), ~frozen), w1


def test_random_selection_moves_exactly_the_learner_rows_of_the_real_model(tmp_path):
    out = tmp_path / "run"
    finetune(FinetuneConfig(task="cola", model="minilm", method="random10-attn", epochs=1, batch_size=16,
                            max_train_examples=32, max_length=48, out=str(out)), progress=False)
    tuned = AutoModelForSequenceClassification.from_pretrained(out / "model").state_dict()
    base = AutoModelForSequenceClassification.from_pretrained(packaged_minilm_path(), num_labels=2).state_dict()
    for layer in range(6):
        prefix = f"bert.encoder.layer.{layer}"
        moved = (tuned[f"{prefix}.intermediate.dense.weight"] != base[f"{prefix}.intermediate.dense.weight"]).any(1)
        assert moved.sum().item() == round(0.1 * 1536)  # exactly the learners; 1382 frozen rows bit-identical
        assert torch.equal(tuned[f"{prefix}.attention.self.key.weight"], base[f"{prefix}.attention.self.key.weight"])


@pytest.mark.parametrize("method", ["full", "far10-emb"])
def test_accounted_peak_agrees_with_the_profiled_allocator_on_minilm(method):
    """The accounting vs an independent measurement (the CPU allocator's events under torch.profiler)."""
    from fedfar.devices.budget import prepare_for_accounting
    from fedfar.devices.memory import account, profiled_peak_bytes
    from fedfar.methods import parse_method
    from fedfar.models import load_model, random_batch

    model = load_model("minilm", 2, seed=0)
    prepare_for_accounting(model, parse_method(method))
    batch = random_batch(model, 16, 64)
    accounted = account(model, batch).peak_training_bytes
    measured = profiled_peak_bytes(model, batch)
    assert measured["resident_bytes"] < accounted  # the step itself must add something
    assert 0.85 < measured["measured_peak_bytes"] / accounted < 1.15


def test_lora_finetune_saves_a_merged_checkpoint_that_predicts_what_was_evaluated(tmp_path, monkeypatch):
    from fedfar.data import by_length, get_task, load_glue, make_loader, tokenize
    from fedfar.train import predict
    from transformers import AutoTokenizer

    evaluated, real_predict = [], fedfar.finetune.predict
    monkeypatch.setattr(fedfar.finetune, "predict", lambda m, loader: evaluated.append(real_predict(m, loader))
                        or evaluated[-1])
    out = tmp_path / "run"
    summary = finetune(FinetuneConfig(task="cola", model="minilm", method="lora8", epochs=1, batch_size=16,
                                      max_train_examples=32, max_length=48, out=str(out)), progress=False)
    assert summary["trainable_params"] == 6 * 2 * 8 * (384 + 384) + 384 * 2 + 2
    tuned = AutoModelForSequenceClassification.from_pretrained(out / "model")
    base = AutoModelForSequenceClassification.from_pretrained(packaged_minilm_path(), num_labels=2).state_dict()
    changed = {n for n, t in tuned.state_dict().items() if not torch.equal(t, base[n])}
    assert changed == {f"bert.encoder.layer.{i}.attention.self.{p}.weight" for i in range(6)
                       for p in ("query", "value")} | {"classifier.weight", "classifier.bias"}
    # The merged checkpoint, loaded with plain transformers, predicts the dev logits the metric was computed from.
    task = get_task("cola")
    tok = AutoTokenizer.from_pretrained(out / "model")
    dev = load_glue(task, task.dev_splits[0], default_glue_dir())
    loader = make_loader(by_length(tokenize(dev, tok, task, 48)), tok, 128, shuffle=False)  # fedfar's eval order
    logits, _ = predict(tuned, loader)
    (reported, _), = evaluated
    assert abs(logits - reported).max() < 1e-4
