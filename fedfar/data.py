"""GLUE data for fedfar: task registry, loading, metrics, tokenization and federated partitions.

Everything is normalized to the schema of the Hugging Face hub dataset ``nyu-mll/glue``
(text columns + ``label`` + ``idx``), whether it comes from the hub or from a local folder in
the classic GLUE TSV layout, so the rest of the project never sees per-task raw formats.
"""

from __future__ import annotations

import csv
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

# datasets, flwr-datasets, scipy and scikit-learn are imported where they are used: a deployed ClientApp is a fresh
# process per message, and one that opens its partition from the node's disk cache needs none of them (~3 s).
if TYPE_CHECKING:
    from datasets import Dataset
    from flwr_datasets.partitioner import Partitioner

# --------------------------------------------------------------------------------------
# Task registry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlueTask:
    """Static description of one GLUE task, in the hub's (``nyu-mll/glue``) vocabulary."""

    name: str
    folder: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    metric_names: tuple[str, ...]
    dev_splits: tuple[str, ...] = ("validation",)

    @property
    def is_regression(self) -> bool:
        """STS-B has no classes: its label is a similarity score in [0, 5]."""
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Size of the model head: one output for regression, else one per class."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def primary_metric(self) -> str:
        """The metric used for model selection and headline numbers."""
        return self.metric_names[0]


_PAIR = ("sentence1", "sentence2")
_NLI2 = ("entailment", "not_entailment")

# MRPC/QQP report F1 first: their classes are imbalanced (MRPC ~68 % positive, QQP ~37 %),
# so accuracy flatters trivial predictors; the GLUE leaderboard also lists them as "F1/Acc".
TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in (
        GlueTask("cola", "CoLA", ("sentence",), ("unacceptable", "acceptable"), ("mcc",)),
        GlueTask("sst2", "SST-2", ("sentence",), ("negative", "positive"), ("accuracy",)),
        GlueTask("mrpc", "MRPC", _PAIR, ("not_equivalent", "equivalent"), ("f1", "accuracy")),
        GlueTask(
            "qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), ("f1", "accuracy")
        ),
        GlueTask("stsb", "STS-B", _PAIR, (), ("pearson", "spearman")),
        GlueTask(
            "mnli",
            "MNLI",
            ("premise", "hypothesis"),
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            ("validation_matched", "validation_mismatched"),
        ),
        GlueTask("qnli", "QNLI", ("question", "sentence"), _NLI2, ("accuracy",)),
        GlueTask("rte", "RTE", _PAIR, _NLI2, ("accuracy",)),
        GlueTask("wnli", "WNLI", _PAIR, ("not_entailment", "entailment"), ("accuracy",)),
    )
}


def _norm(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def get_task(name: str | GlueTask) -> GlueTask:
    """Look up a task by any common spelling ("CoLA", "sst-2", "SST2", "sts-b", ...)."""
    if isinstance(name, GlueTask):
        return name
    task = TASKS.get(_norm(str(name)))
    if task is None:
        raise ValueError(f"Unknown GLUE task {name!r}; valid names: {', '.join(TASKS)}")
    return task


def default_glue_dir() -> Path:
    """Where local GLUE files live: $FEDFAR_GLUE_DIR, else ../shared/data/glue beside the project.

    "The project" is found from this file (an editable install) or from the working directory: Flower runs
    the app from its own copy under $FLWR_HOME/apps, with the project as the working directory.
    """
    env = os.environ.get("FEDFAR_GLUE_DIR")
    if env:
        return Path(env).expanduser()
    candidates = [Path(__file__).resolve().parents[1].parent, Path.cwd().resolve().parent]
    for root in candidates:
        if (root / "shared" / "data" / "glue").is_dir():
            return root / "shared" / "data" / "glue"
    return candidates[0] / "shared" / "data" / "glue"


def resolve_source(data: str) -> str | Path:
    """A `data` setting -> what load_glue takes: "hub", a given classic folder, or "" for the local default."""
    if data == "hub":
        return "hub"
    path = Path(data).expanduser() if data else default_glue_dir()
    if not path.is_dir():
        raise FileNotFoundError(f"GLUE folder {path} does not exist: give a classic GLUE folder "
                                "(<dir>/<Task>/train.tsv, dev.tsv), 'hub', or set FEDFAR_GLUE_DIR")
    return path


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RawFormat:
    """How one task's classic TSV maps onto the hub schema."""

    text: tuple[str, ...]  # raw column per hub text column (same order as task.text_columns)
    label: str
    header: bool = True
    skip_malformed: bool = False  # QQP's release has lines broken by embedded newlines


_COLA_COLUMNS = ("source", "label", "original_mark", "sentence")  # CoLA has no header row

_RAW: dict[str, _RawFormat] = {
    "cola": _RawFormat(("sentence",), "label", header=False),
    "sst2": _RawFormat(("sentence",), "label"),
    "mrpc": _RawFormat(("#1 String", "#2 String"), "Quality"),
    "qqp": _RawFormat(("question1", "question2"), "is_duplicate", skip_malformed=True),
    "stsb": _RawFormat(_PAIR, "score"),
    "mnli": _RawFormat(_PAIR, "gold_label"),
    "qnli": _RawFormat(("question", "sentence"), "label"),
    "rte": _RawFormat(_PAIR, "label"),
    "wnli": _RawFormat(_PAIR, "label"),
}

_SPLIT_FILES = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
}


def _check_split(task: GlueTask, split: str) -> str:
    """Return the canonical split name; plain "validation" means matched for MNLI."""
    if task.name == "mnli" and split == "validation":
        return "validation_matched"
    valid = ("train", *task.dev_splits)
    if split not in valid:
        raise ValueError(f"Unknown split {split!r} for GLUE task {task.name!r}; valid: {valid}")
    return split


def _features(task: GlueTask):
    from datasets import ClassLabel, Features, Value

    label = Value("float32") if task.is_regression else ClassLabel(names=list(task.label_names))
    texts = {c: Value("string") for c in task.text_columns}
    return Features({**texts, "label": label, "idx": Value("int32")})


def load_glue(task: str | GlueTask, split: str, source: str | Path = "hub") -> Dataset:
    """Load one GLUE split with the hub schema, from the hub or a classic GLUE folder.

    ``source="hub"`` downloads ``nyu-mll/glue``; any other value is a directory laid out as
    ``<dir>/<Folder>/train.tsv`` + ``dev.tsv`` (MNLI: ``dev_matched.tsv``/``dev_mismatched.tsv``),
    as written by the standard ``download_glue_data.py`` - for machines without hub access.
    """
    task = get_task(task)
    split = _check_split(task, split)
    if isinstance(source, str) and source == "hub":
        from datasets import load_dataset

        return load_dataset("nyu-mll/glue", task.name, split=split)
    return _read_classic(task, split, Path(source))


def _task_file(task: GlueTask, split: str, root: Path) -> Path:
    path = root / task.folder / _SPLIT_FILES[split]
    if path.is_file():
        return path
    layout = f"<dir>/{task.folder}/{_SPLIT_FILES[split]} (classic GLUE layout, <dir>/<Folder>/train.tsv)"
    hint = ""
    if not root.is_dir():
        hint = f"; the directory {root} does not exist"
    elif (root / _SPLIT_FILES[split]).is_file():
        hint = f"; {root} looks like a task folder itself - pass its parent directory"
    raise FileNotFoundError(f"GLUE file not found: {path}. Expected {layout}{hint}.")


def _read_classic(task: GlueTask, split: str, root: Path) -> Dataset:
    path = _task_file(task, split, root)
    fmt = _RAW[task.name]
    parse_label = _label_parser(task, path)
    texts: list[list[str]] = [[] for _ in fmt.text]
    labels: list[Any] = []
    idxs: list[int] = []
    # QUOTE_NONE: GLUE text has unbalanced '"'; default quoting merges lines and loses rows.
    # utf-8-sig: MRPC's header (copied from the MS release) starts with a BOM.
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = list(_COLA_COLUMNS) if not fmt.header else next(reader, [])
        wanted = (*fmt.text, fmt.label)
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise ValueError(
                f"{path}: expected columns {list(wanted)} for {task.folder} but the header has "
                f"{columns} (missing {missing})."
            )
        text_pos = [columns.index(c) for c in fmt.text]
        label_pos = columns.index(fmt.label)
        row_no = -1
        for row in reader:
            if not row:  # tolerate blank lines (e.g. a trailing empty line)
                continue
            row_no += 1
            if len(row) != len(columns):
                if fmt.skip_malformed:
                    continue
                raise ValueError(
                    f"{path}, line {reader.line_num}: expected {len(columns)} tab-separated "
                    f"fields {columns}, found {len(row)}."
                )
            for out, pos in zip(texts, text_pos):
                out.append(row[pos])
            labels.append(parse_label(row[label_pos], reader.line_num))
            idxs.append(row_no)
    from datasets import Dataset

    data = {c: col for c, col in zip(task.text_columns, texts)}
    return Dataset.from_dict({**data, "label": labels, "idx": idxs}, features=_features(task))


def _label_parser(task: GlueTask, path: Path) -> Callable[[str, int], int | float]:
    """Build a raw-label -> hub-label function that names file and line on bad values."""

    def bad(value: str, line: int, expected: str) -> ValueError:
        return ValueError(f"{path}, line {line}: unknown label value {value!r}; expected {expected}.")

    if task.is_regression:

        def parse_score(value: str, line: int) -> float:
            try:
                return float(value)
            except ValueError:
                raise bad(value, line, "a float similarity score") from None

        return parse_score

    names = task.label_names
    valid = range(len(names))

    def parse_class(value: str, line: int) -> int:
        value = value.strip()
        if value in names:  # string labels (MNLI, QNLI, RTE)
            return names.index(value)
        if value.isdigit() and int(value) in valid:  # numeric labels (CoLA, SST-2, MRPC, QQP, WNLI)
            return int(value)
        raise bad(value, line, f"one of {list(names)} or 0..{len(names) - 1}")

    return parse_class


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def compute_metrics(task: str | GlueTask, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """GLUE metrics with sklearn/scipy (no `evaluate`: it fetches metric scripts from the hub).

    ``predictions`` may be logits ``(N, C)``, class ids ``(N,)``, or for STS-B scores ``(N,)``/``(N, 1)``.
    Returns exactly ``task.metric_names`` as keys.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    task = get_task(task)
    preds, gold = np.asarray(predictions), np.asarray(labels)
    if task.is_regression:
        preds, gold = preds.astype(np.float64).reshape(-1), gold.astype(np.float64).reshape(-1)
        if preds.shape != gold.shape:
            raise ValueError(f"need one score per example: {np.shape(predictions)} vs {gold.shape}")
    elif preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    elif preds.ndim != 1 or not np.all(np.mod(preds, 1) == 0):
        raise ValueError(f"expected logits (N, C) or integer class ids (N,); got {preds.dtype} {preds.shape}")
    metrics: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "accuracy": accuracy_score,
        "mcc": matthews_corrcoef,
        "f1": lambda y, p: f1_score(y, p, zero_division=0.0),  # positive class = 1 (duplicate/equivalent)
        "pearson": lambda y, p: pearsonr(p, y)[0],
        "spearman": lambda y, p: spearmanr(p, y)[0],
    }
    return {name: float(metrics[name](gold, preds)) for name in task.metric_names}


# --------------------------------------------------------------------------------------
# Tokenization and loaders
# --------------------------------------------------------------------------------------


_TOKENIZER_HASHES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _tokenizer_hash(tokenizer: Any) -> str:
    """datasets' hash of a tokenizer (its vocabulary pickled), once per tokenizer object: hashing it for every
    `map` took ~250 ms, nearly all of the cost of opening a client with a few sentences."""
    from datasets.fingerprint import Hasher

    if tokenizer not in _TOKENIZER_HASHES:
        _TOKENIZER_HASHES[tokenizer] = Hasher.hash(tokenizer)
    return _TOKENIZER_HASHES[tokenizer]


def tokenize(ds: Dataset, tokenizer: Any, task: str | GlueTask, max_length: int = 128) -> Dataset:
    """Tokenize (truncate, no padding: the collator pads per batch) and keep model inputs + "labels"."""
    from datasets import Value
    from datasets.fingerprint import Hasher

    task = get_task(task)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(*(batch[c] for c in task.text_columns), truncation=True, max_length=max_length)
        return {**enc, "labels": batch["label"]}

    # The fingerprint datasets would compute, from the same inputs, with the tokenizer's hash reused: it names
    # the cache file of a dataset read from disk (the hub's), so it must change whenever the output would.
    fingerprint = Hasher.hash((ds._fingerprint, _tokenizer_hash(tokenizer), task.name, task.text_columns,
                               max_length, "fedfar.tokenize/1"))
    out = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"tokenize {task.name}",
                 new_fingerprint=fingerprint)
    return out.cast_column("labels", Value("float32" if task.is_regression else "int64"))


def make_loader(
    ds_tok: Dataset, tokenizer: Any, batch_size: int, shuffle: bool, seed: int = 0
) -> DataLoader:
    """Batches padded to the longest example in each batch; shuffling is seeded (reproducible)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(
        ds_tok,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=DataCollatorWithPadding(tokenizer),
    )


def by_length(ds_tok: Dataset) -> Dataset:
    """The rows shortest first, for evaluation: batches of similar length pad less, and every GLUE metric is the
    same in any order of (prediction, label) pairs."""
    return ds_tok.select(np.argsort([len(ids) for ids in ds_tok["input_ids"]], kind="stable"))


def reshuffled(loader, seed: int):
    """The same data and batching, shuffled from `seed` (anything but a DataLoader, e.g. a fixed list of batches,
    is returned as it is)."""
    if not isinstance(loader, DataLoader):
        return loader
    return DataLoader(loader.dataset, batch_size=loader.batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed), collate_fn=loader.collate_fn)


# --------------------------------------------------------------------------------------
# Federated partitioning
# --------------------------------------------------------------------------------------

PARTITION_SCHEMES = ("iid", "dirichlet", "shard", "quantity")
_LABEL_SCHEMES = ("dirichlet", "shard")
_BIN_COLUMN = "_fedfar_label_bin"  # temporary class-like column for STS-B scores


class _SeededShuffle:
    """Shuffle (seeded) before an order-based partitioner cuts contiguous blocks.

    IidPartitioner and the size-skew partitioners slice the dataset in file order, and GLUE
    files are sorted (CoLA by source), so without this "iid" would not be IID. A partitioner by duck
    typing (`dataset`, `load_partition`, `num_partitions`), so that flwr-datasets is imported only when used.
    """

    def __init__(self, inner: Partitioner, num_partitions: int, seed: int) -> None:
        self._inner, self.num_partitions, self._seed = inner, num_partitions, seed
        self.dataset: Dataset | None = None

    def load_partition(self, partition_id: int) -> Dataset:
        if self.dataset is None:
            raise ValueError("assign a dataset first: partitioner.dataset = ds")
        if not self._inner.is_dataset_assigned():
            self._inner.dataset = self.dataset.shuffle(seed=self._seed)
        return self._inner.load_partition(partition_id)


def make_partitioner(
    scheme: str,
    num_partitions: int,
    *,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    seed: int = 42,
    min_partition_size: int = 2,
    quantity_skew: str = "linear",
    partition_by: str = "label",
) -> Partitioner:
    """Build a seeded flwr-datasets partitioner for one heterogeneity scheme.

    - iid: IidPartitioner on a seeded shuffle (equal sizes, global label mix).
    - dirichlet: label skew, per-class proportions ~ Dir(alpha) (smaller alpha = more skew).
    - shard: sort by label, cut 2*N shards, give each client ``shards_per_partition`` (McMahan et al.).
    - quantity: size skew with the global label mix; sizes grow with the partition id as
      ``quantity_skew`` = "linear" (default: mild, never empty), "square" or "exponential"
      (extreme; small clients get empty with many partitions -> flwr raises).
    """
    from flwr_datasets.partitioner import (DirichletPartitioner, ExponentialPartitioner, IidPartitioner,
                                           LinearPartitioner, ShardPartitioner, SquarePartitioner)

    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"Unknown partition scheme {scheme!r}; valid: {', '.join(PARTITION_SCHEMES)}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    quantity = {"linear": LinearPartitioner, "square": SquarePartitioner, "exponential": ExponentialPartitioner}
    if scheme == "iid":
        return _SeededShuffle(IidPartitioner(num_partitions), num_partitions, seed)
    if scheme == "dirichlet":
        return DirichletPartitioner(
            num_partitions,
            partition_by=partition_by,
            alpha=alpha,
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    if scheme == "shard":
        return ShardPartitioner(
            num_partitions,
            partition_by=partition_by,
            num_shards_per_partition=shards_per_partition,
            shuffle=True,
            seed=seed,
        )
    if quantity_skew not in quantity:
        raise ValueError(f"Unknown quantity_skew {quantity_skew!r}; valid: {', '.join(quantity)}")
    return _SeededShuffle(quantity[quantity_skew](num_partitions), num_partitions, seed)


def _assigned_partitioner(
    ds: Dataset, num_partitions: int, scheme: str, **kw: Any
) -> tuple[Partitioner, bool]:
    """Partitioner with ``ds`` assigned; float labels are binned (round(score)) for label schemes."""
    if num_partitions > len(ds):
        raise ValueError(f"Cannot split {len(ds)} examples into {num_partitions} partitions (need >= 1 each)")
    binned = scheme in _LABEL_SCHEMES and ds.features["label"].dtype.startswith("float")
    if binned:
        bins = np.rint(np.asarray(ds["label"], dtype=np.float64)).astype(np.int64)  # 0..5
        ds = ds.add_column(_BIN_COLUMN, bins)
    part = make_partitioner(scheme, num_partitions, partition_by=_BIN_COLUMN if binned else "label", **kw)
    part.dataset = ds
    return part, binned


class PartitionIndex:
    """One seeded split of ``ds`` into ``num_partitions``, computed once and read many times.

    The partitioner shuffles (or, for label schemes, assigns) the whole dataset on its first read and keeps the
    result, so a worker that serves many clients pays that cost once, not once per client: a client's share is
    then a slice of an index. Deterministic in (ds, scheme, num_partitions, seed, kw)."""

    def __init__(self, ds: Dataset, num_partitions: int, scheme: str = "iid", **kw: Any) -> None:
        self.partitioner, self.binned = _assigned_partitioner(ds, num_partitions, scheme, **kw)
        self.num_partitions = num_partitions

    def load(self, partition_id: int) -> Dataset:
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(f"partition_id must be in [0, {self.num_partitions}), got {partition_id}")
        out = self.partitioner.load_partition(partition_id)
        return out.remove_columns(_BIN_COLUMN) if self.binned else out


def carve_holdout(ds: Dataset, examples: int, seed: int) -> tuple[Dataset, Dataset]:
    """(the rest, a seeded holdout of `examples` rows) of a train set, for choosing hyperparameters on data that is
    neither dev nor any client's: the study tunes learning rates on it and reports dev. The rest keeps file order."""
    if not 0 < examples < len(ds):
        raise ValueError(f"holdout-examples = {examples}: must be between 1 and {len(ds) - 1} (the train set has "
                         f"{len(ds)} rows); 0 evaluates on dev")
    order = np.random.default_rng(seed).permutation(len(ds))
    held = np.sort(order[:examples])
    rest = np.sort(order[examples:])
    return ds.select(rest), ds.select(held)


def load_partition(
    ds: Dataset,
    partition_id: int,
    num_partitions: int,
    scheme: str = "iid",
    *,
    alpha: float = 0.5,
    seed: int = 42,
    **kw: Any,
) -> Dataset:
    """One client's share of ``ds``; deterministic in (ds, scheme, num_partitions, seed, kw).

    Every client process recomputes the full split from the same seed and keeps its own part,
    so no partition state has to be shipped around. ``kw`` goes to :func:`make_partitioner`.
    A process serving many clients keeps a :class:`PartitionIndex` instead.
    """
    return PartitionIndex(ds, num_partitions, scheme, alpha=alpha, seed=seed, **kw).load(partition_id)


def partition_summary(
    ds: Dataset, num_partitions: int, scheme: str, task: str | GlueTask, **kw: Any
) -> list[dict[str, Any]]:
    """Sizes and label histograms per partition, to report how heterogeneous a split is.

    Classification: ``label_counts`` keyed by label name. STS-B: keyed by rounded score
    "0".."5", plus ``label_mean``.
    """
    task = get_task(task)
    index = PartitionIndex(ds, num_partitions, scheme, **kw)
    keys = [str(b) for b in range(6)] if task.is_regression else list(task.label_names)
    summary = []
    for pid in range(num_partitions):
        labels = np.asarray(index.load(pid)["label"])
        bins = np.rint(labels).astype(np.int64) if task.is_regression else labels
        counts = np.bincount(bins, minlength=len(keys))
        entry: dict[str, Any] = {
            "partition_id": pid,
            "num_examples": int(len(labels)),
            "label_counts": {k: int(c) for k, c in zip(keys, counts)},
        }
        if task.is_regression:
            entry["label_mean"] = float(labels.mean()) if len(labels) else float("nan")
        summary.append(entry)
    return summary
