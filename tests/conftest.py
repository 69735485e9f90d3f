import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForSequenceClassification  # noqa: E402

TINY = {
    "bert": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64),
    "roberta": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64),
    "xlm-roberta": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64),
    "electra": dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                    embedding_size=16),
    "distilbert": dict(n_layers=2, dim=32, n_heads=2, hidden_dim=64),
}


def tiny_model(model_type: str = "bert", num_labels: int = 2, seed: int = 0, dropout: bool = False, **kw):
    """A random-weight model of a supported family, small enough for exact checks in milliseconds."""
    fields = dict(TINY[model_type], vocab_size=100, num_labels=num_labels, **kw)
    if not dropout:
        fields.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dropout=0.0,
                      attention_dropout=0.0, seq_classif_dropout=0.0, classifier_dropout=0.0)
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(AutoConfig.for_model(model_type, **fields))


def tiny_batch(batch_size: int = 4, seq_len: int = 9, seed: int = 0, num_labels: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(5, 100, (batch_size, seq_len), generator=gen),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
        "labels": torch.randint(0, num_labels, (batch_size,), generator=gen),
    }


def mcc_by_hand(pred, gold) -> float:
    """Matthews correlation from the confusion counts, independent of the library's metric (0 when a margin is
    empty, as sklearn has it)."""
    tp, tn = int(((pred == 1) & (gold == 1)).sum()), int(((pred == 0) & (gold == 0)).sum())
    fp, fn = int(((pred == 1) & (gold == 0)).sum()), int(((pred == 0) & (gold == 1)).sum())
    den = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)) ** 0.5
    return (tp * tn - fp * fn) / den if den else 0.0


class ListLoader(list):
    """A list of batches with the one attribute train() reads from a DataLoader."""
    dataset = range(0)


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    # flwr 1.41's Message(content, dst_node_id, message_type) reads run/node/task ids
    # set by the runtime; set them for the test only.
    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)


# Longer limits (pyproject.toml sets 120 s) for tests that start a simulation or a deployment; a module-scoped
# fixture's run counts against the first test that uses it. An explicit @pytest.mark.timeout on a test wins.
_TIMEOUTS = {"ray": 1200, "realdata": 900, "deploy": 1800}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout"):
            continue
        limits = [s for marker, s in _TIMEOUTS.items() if item.get_closest_marker(marker)]
        if limits:
            item.add_marker(pytest.mark.timeout(max(limits)))
