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
    for cache in (CACHE.models, CACHE.partitions, CACHE.profiles, CACHE.plans):
        cache.clear()  # a cold worker
    Job.open(ctx.run_config, ctx.node_config, 2)
    cold = torch.get_rng_state()
    torch.manual_seed(12345)  # whatever the worker drew in between
    Job.open(ctx.run_config, ctx.node_config, 2)
    assert torch.equal(cold, torch.get_rng_state())
    assert torch.equal(cold, torch.manual_seed(0 + 7919 * 1 + 2).get_state())  # the client's own seed, untouched
