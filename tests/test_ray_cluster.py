"""The simulation on a Ray cluster we start ourselves: a head on 127.0.0.1 on its own port, as our child."""
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from fedfar.data import default_glue_dir
from fedfar.federation.launch import PROJECT_DIR, bin_path, flower_env, free_port, port_in_use, run_simulation
from fedfar.federation.processes import process_tree, stop_process_tree

pytestmark = [pytest.mark.ray]


def test_a_simulation_runs_its_client_actors_on_a_ray_head_started_for_it(tmp_path):
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # Ray's socket paths must stay under 107 characters
    head = subprocess.Popen(
        [bin_path("ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         "--num-cpus=2", f"--temp-dir={temp}", "--include-dashboard=false", "--disable-usage-stats"],
        env=flower_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not port_in_use(port):
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head never listened"
            time.sleep(0.5)
        overrides = {"results-dir": str(tmp_path), "run-name": "on-cluster", "data": str(default_glue_dir()),
                     "num-rounds": 1, "save-model": False}
        assert run_simulation(PROJECT_DIR / "configs" / "tiny.toml", 2, overrides=overrides, stream=False,
                              ray_address=f"127.0.0.1:{port}") == 0
        assert (tmp_path / "on-cluster" / "summary.json").exists()
        # Ray names the actor each worker hosts in that worker's log, in the head's session folder: the
        # ClientApp actors ran on this head, not on a Ray instance the simulation started for itself.
        logs = [p for p in temp.glob("session_*/logs/worker-*") if p.is_file()]
        assert any(":actor_name:ClientAppActor" in p.read_text(errors="replace") for p in logs)
    finally:
        stop_process_tree(head)
        shutil.rmtree(temp, ignore_errors=True)
    assert not process_tree(head.pid)
