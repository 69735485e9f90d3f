"""The ClientApp's handlers called directly with a real Flower context (no Ray): what a client does per round."""
import pytest
import torch
from flwr.app import Context, RecordDict

from fedfar.federation.client import CACHE, Job
from fedfar.federation.launch import run_config_values


@pytest.mark.realdata
@pytest.mark.parametrize("fleet", ["", "configs/fleets/mixed_edge.toml"])
def test_a_client_draws_the_same_randomness_in_a_cold_and_a_warm_worker(fleet, task_identity):
    """A worker's first round loads the model (which reseeds and initialises a head) and plans the device budget
    (a real step, with dropout): none of it may shift the dropout masks of the client it serves."""
    ctx = Context(run_id=0, node_id=1, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                  run_config=run_config_values("configs/tiny.toml", {"fleet": fleet}))
    for cache in (CACHE.models, CACHE.datasets, CACHE.indexes, CACHE.partitions, CACHE.profiles, CACHE.plans):
        cache.clear()  # a cold worker
    Job.open(ctx.run_config, ctx.node_config, 2)
    cold = torch.get_rng_state()
    torch.manual_seed(12345)  # whatever the worker drew in between
    Job.open(ctx.run_config, ctx.node_config, 2)
    assert torch.equal(cold, torch.get_rng_state())
    assert torch.equal(cold, torch.manual_seed(0 + 7919 * 1 + 2).get_state())  # the client's own seed, untouched


@pytest.mark.realdata
def test_a_worker_splits_the_data_once_and_keeps_a_bounded_number_of_clients():
    """Opening a client is a slice of the worker's one split (not a re-read and re-split of the train set), and
    the per-client cache keeps the most recently used entries only, so memory is flat in the number of clients."""
    from fedfar.federation.client import Bounded, WorkerCache
    from fedfar.federation.config import RunConfig

    lru = Bounded(2)
    made = []
    for key in ("a", "b", "a", "c", "a"):
        lru.get_or(key, lambda: made.append(key) or key.upper())
    assert made == ["a", "b", "c"] and list(lru) == ["c", "a"]  # "b" was least recently used

    cache = WorkerCache(partitions=Bounded(3))
    cfg = RunConfig(task="cola", model="random:bert-tiny", max_length=16)
    for pid in range(5):
        train_ds, _ = cache.partition(cfg, pid, 1000)
        assert 8 <= len(train_ds) <= 9  # 8,551 CoLA sentences over 1,000 clients
    assert len(cache.datasets) == 1 and len(cache.indexes) == 1 and len(cache.partitions) == 3
    first = cache.partition(cfg, 4, 1000)[0]
    assert cache.partition(cfg, 4, 1000)[0] is first  # kept: no second tokenization


@pytest.mark.realdata
def test_a_node_disk_cache_serves_a_fresh_process_the_same_partition_plan_and_update(tmp_path, task_identity):
    """A deployed node keeps its model, tokenized partition and device plan on disk (node config `cache-dir`): a
    message in a fresh process (an empty worker cache) reads them back instead of re-loading, re-splitting,
    re-tokenizing and re-planning, and trains bit-identically to one that computed them."""
    from fedfar.federation import client
    from fedfar.federation.codecs import decode
    from fedfar.methods.far import ffn_sizes, random_learners

    disk = tmp_path / "node-cache"
    run_config = run_config_values("configs/tiny.toml", {"fleet": "configs/fleets/mixed_edge.toml",
                                                         "federated-eval": True, "eval-share": 0.25})
    node_config = {"partition-id": 1, "num-partitions": 2}

    def fresh_message(node_config, state: RecordDict):
        client.CACHE = client.WorkerCache()  # what a new ClientApp process starts with
        ctx = Context(run_id=0, node_id=1, node_config=node_config, state=state, run_config=run_config)
        job = Job.open(ctx.run_config, ctx.node_config, 1)
        rows = random_learners(ffn_sizes(job.model), 0.25, seed=0)  # the server's global mask
        part = client.encode(client.exchange.select(job.model.state_dict(), job.cfg.spec.exchange_plan(job.model),
                                                    rows))
        return job, decode(job.train(part, state)["delta"])

    old = client.CACHE
    try:
        plain_job, plain = fresh_message(node_config, RecordDict())
        first_job, first = fresh_message({**node_config, "cache-dir": str(disk)}, RecordDict())
        written = sorted(p.relative_to(disk).parts[0] for p in disk.rglob("*.pkl"))
        assert written == ["models", "partitions", "plans"]
        # A fresh process with a warm disk neither reads the train set nor splits it, nor builds the model.
        client.load_glue = client.load_model = None
        try:
            warm_job, warm = fresh_message({**node_config, "cache-dir": str(disk)}, RecordDict())
        finally:
            from fedfar.data import load_glue
            from fedfar.models import load_model
            client.load_glue, client.load_model = load_glue, load_model
    finally:
        client.CACHE = old
    assert [dict(r) for r in plain_job.loader.dataset] == first_job.loader.dataset == warm_job.loader.dataset
    assert list(plain_job.held_out) == warm_job.held_out and len(warm_job.held_out) > 0
    assert warm_job.device.plan.train.report == plain_job.device.plan.train.report  # the plan, read back
    assert repr(warm_job.model) == repr(plain_job.model)
    assert list(plain) == list(warm) and all(torch.equal(plain[k], warm[k]) for k in plain)
    assert all(torch.equal(first[k], warm[k]) for k in plain)


def test_a_node_disk_entry_is_written_once_recomputed_when_damaged_and_never_fatal(tmp_path):
    from fedfar.federation.client import NodeDisk

    disk, made = NodeDisk(tmp_path / "cache"), []
    make = lambda: made.append(1) or {"rows": [1, 2, 3]}  # noqa: E731
    assert disk.get_or("partitions", ("a", 1), make) == disk.get_or("partitions", ("a", 1), make) == {"rows": [1, 2, 3]}
    assert len(made) == 1 and disk.path("partitions", ("a", 1)).is_file()
    assert disk.get_or("partitions", ("a", 2), make) and len(made) == 2  # another key, another entry
    disk.path("partitions", ("a", 1)).write_bytes(b"torn")  # a write cut short
    assert disk.get_or("partitions", ("a", 1), make) == {"rows": [1, 2, 3]} and len(made) == 3
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    assert NodeDisk(blocked).get_or("plans", ("b",), make) == {"rows": [1, 2, 3]}  # cannot write: still served
    assert list(tmp_path.glob("**/*.tmp")) == []
