"""Real data, real model, small: the packaged MiniLM-L6 fine-tuned on a slice of the shared CoLA files."""
import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from fedfar.data import default_glue_dir
from fedfar.finetune import FinetuneConfig, finetune
from fedfar.models import packaged_minilm_path

pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not default_glue_dir().is_dir(), reason="shared GLUE files not found")]


def test_far_finetune_on_cola_writes_an_ordinary_checkpoint_with_frozen_rows_untouched(tmp_path):
    out = tmp_path / "run"
    summary = finetune(FinetuneConfig(task="cola", model="minilm", method="far10-emb", epochs=1, batch_size=16,
                                      max_train_examples=64, max_length=48, out=str(out)), progress=False)
    assert summary["steps"] == 4 and summary["priming_steps"] == 1
    assert -1.0 <= summary["final"]["mcc"] <= 1.0
    assert json.loads((out / "config.json").read_text())["method"] == "far10-emb"
    assert json.loads((out / "metrics.json").read_text())["history"][0]["epoch"] == 1

    tuned = AutoModelForSequenceClassification.from_pretrained(out / "model").state_dict()
    base = AutoModelForSequenceClassification.from_pretrained(packaged_minilm_path(), num_labels=2).state_dict()
    # Embeddings are frozen under far10-emb, during priming too: bit-identical to the packaged checkpoint.
    assert torch.equal(tuned["bert.embeddings.word_embeddings.weight"], base["bert.embeddings.word_embeddings.weight"])
    assert not torch.equal(tuned["bert.encoder.layer.0.attention.self.query.weight"],
                           base["bert.encoder.layer.0.attention.self.query.weight"])


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
