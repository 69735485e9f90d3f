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
