"""A node's warm worker (fedfar.federation.node_worker) in a real process: what it serves equals what the ClientApp
process computes itself, the node's state comes back, failures fail the message but not the worker, and only a
peer with its key may connect."""
import os
import signal
import subprocess
from multiprocessing.connection import AuthenticationError, Client

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

from fedfar.federation import client, deploy, launch, node_worker, processes
from fedfar.federation.codecs import decode
from fedfar.federation.launch import PROJECT_DIR, run_config_values
from fedfar.methods.far import ffn_sizes, random_learners

pytestmark = pytest.mark.realdata


def _start(socket, ready) -> subprocess.Popen:
    """`fedfar node-worker` as the deployment starts it, its output in a log beside the socket."""
    log = socket.with_suffix(".log")
    proc = deploy.start_server(deploy.node_worker_command(socket, ready), launch.flower_env(PROJECT_DIR),
                               PROJECT_DIR, log)
    try:
        deploy.wait_for_workers([ready], [proc], [log], timeout=120)
    except RuntimeError:
        processes.stop_process_tree(proc)
        raise
    return proc


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    folder = tmp_path_factory.mktemp("node")
    socket = folder / "w.sock"
    proc = _start(socket, folder / "ready")
    try:
        yield socket, proc
    finally:
        processes.stop_process_tree(proc)
    assert not processes.process_tree(proc.pid)


def _context(socket, **overrides) -> Context:
    run_config = run_config_values("configs/tiny.toml", overrides)
    node_config = {"partition-id": 1, "num-partitions": 2, "worker": str(socket)}
    return Context(run_id=0, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


def _train_content(ctx: Context) -> RecordDict:
    """What the server sends in round 1: the trainable part of the pristine model under a random global mask."""
    job = client.Job.open(ctx.run_config, ctx.node_config, 1)
    rows = random_learners(ffn_sizes(job.model), 0.25, seed=0)
    part = client.encode(client.exchange.select(job.model.state_dict(), job.cfg.spec.exchange_plan(job.model), rows))
    return RecordDict({"part": part, "config": ConfigRecord({"server-round": 1})})


@pytest.mark.parametrize("mask_mode", ["global", "local"])
def test_the_worker_replies_what_the_clientapp_process_computes_and_returns_the_state(worker, mask_mode):
    socket, _ = worker
    ctx = _context(socket, **{"mask-mode": mask_mode})
    content = _train_content(ctx)
    here = client.handle("train", content, ctx.run_config, ctx.node_config, here_state := RecordDict())
    served = node_worker.handle("train", content, ctx)
    a, b = decode(here["delta"]), decode(served["delta"])
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert served["metrics"]["train-loss"] == here["metrics"]["train-loss"]
    # Every message it serves reports a cold start from the ClientApp process's own start, and its own time.
    assert {"boot-s", "import-s", "to-step-s", "cold-start-s", "worker-s"} <= set(served["metrics"])
    assert 0 < served["metrics"]["worker-s"] < served["metrics"]["cold-start-s"]
    if mask_mode == "local":  # the device's own learners, chosen in the worker, are kept in the node's state
        assert list(ctx.state.keys()) == ["learners"] == list(here_state.keys())
        mine, theirs = decode(ctx.state["learners"]), decode(here_state["learners"])
        assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    else:
        assert not list(ctx.state.keys())


def test_a_failing_message_fails_and_the_worker_serves_the_next(worker):
    socket, proc = worker
    ctx = _context(socket)
    with pytest.raises(RuntimeError, match="node worker: ValueError: unknown message kind 'bogus'"):
        node_worker.handle("bogus", RecordDict(), ctx)
    reply = node_worker.handle("register", RecordDict(), ctx)
    assert reply["metrics"]["partition-id"] == 1 and reply["metrics"]["worker-s"] > 0
    assert proc.poll() is None


def test_a_peer_without_the_key_is_refused_and_the_worker_stays_up(worker):
    socket, proc = worker
    assert oct(os.stat(node_worker.key_path(socket)).st_mode & 0o777) == "0o600"
    assert os.stat(socket).st_mode & 0o077 == 0  # the socket: its user only
    with pytest.raises(AuthenticationError):
        Client(str(socket), family="AF_UNIX", authkey=b"not the key")
    assert node_worker.handle("register", RecordDict(), _context(socket))["metrics"]["worker-s"] > 0
    assert proc.poll() is None


def test_without_a_worker_the_clientapp_process_runs_the_message_itself(tmp_path):
    ctx = _context(tmp_path / "nobody.sock")
    reply = node_worker.handle("register", RecordDict(), ctx)
    assert reply["metrics"]["partition-id"] == 1 and "worker-s" not in reply["metrics"]


def test_bad_sockets_are_refused_before_any_import(worker, tmp_path):
    socket, _ = worker
    with pytest.raises(ValueError, match="at most 100: choose a shorter path"):
        node_worker.serve(tmp_path / ("x" * 120))
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        node_worker.serve(tmp_path / "missing" / "w.sock")
    with pytest.raises(RuntimeError, match="already serves"):
        node_worker.serve(socket)


def test_sigterm_removes_the_socket_and_its_key_and_a_stale_socket_is_replaced(tmp_path):
    socket, ready = tmp_path / "w.sock", tmp_path / "ready"
    proc = _start(socket, ready)
    try:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not socket.exists() and not node_worker.key_path(socket).exists()
        socket.touch()  # what a killed worker leaves behind
        ready.unlink()
        proc = _start(socket, ready)
        assert node_worker.handle("register", RecordDict(), _context(socket))["metrics"]["worker-s"] > 0
    finally:
        processes.stop_process_tree(proc)


def test_a_worker_path_in_the_node_config_may_start_with_a_tilde(worker, monkeypatch):
    socket, _ = worker
    monkeypatch.setenv("HOME", str(socket.parent))
    assert node_worker.handle("register", RecordDict(), _context(f"~/{socket.name}"))["metrics"]["worker-s"] > 0
