"""Fast checks of the process plumbing (no Flower run: the end-to-end Ray test lives elsewhere)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedfar.federation import launch, processes


def _gone(pid: int) -> bool:
    """True if `pid` no longer runs (an unreaped zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def _wait_for_children(pid: int, count: int, timeout: float = 5.0) -> set[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tree = processes.process_tree(pid)
        if len(tree) >= count:
            return tree
        time.sleep(0.05)
    raise AssertionError(f"expected {count} processes under {pid}, saw {processes.process_tree(pid)}")


def test_flower_env_sets_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", "/somewhere/else")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    env = launch.flower_env(tmp_path)
    assert env["FLWR_HOME"] == str(tmp_path.resolve() / ".flwr")
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] == "0"
    assert env["TRANSFORMERS_VERBOSITY"]
    assert "HF_HUB_OFFLINE" not in env  # users have internet: never forced
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)
    assert "127.0.0.1" in env["NO_PROXY"].split(",")
    assert os.environ["FLWR_HOME"] == "/somewhere/else"  # a copy: our own environment is untouched


def test_run_simulation_missing_config_fails_before_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    started = []
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: started.append(a) or pytest.fail("started"))
    missing = "configs/does-not-exist.toml"
    with pytest.raises(FileNotFoundError, match="does-not-exist.toml"):
        launch.run_simulation(missing, 2)
    assert not started


def test_run_simulation_rejects_unknown_key_before_starting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: pytest.fail("started"))
    with pytest.raises(ValueError, match="num-roundz"):
        launch.run_simulation(None, 2, overrides={"num-roundz": 1})
    with pytest.raises(ValueError, match="whole number"):
        launch.run_simulation(None, 2, cpus_per_client=0.5)


def test_run_config_args_are_what_flower_parses_back(tmp_path: Path) -> None:
    """A file alone passes through as its path; a file plus overrides becomes one "k=v ..." string, which Flower's
    own parser must read back as the merged values (quotes, booleans and floats included)."""
    from flwr.common.config import parse_config_args

    cfg = tmp_path / "base.toml"
    cfg.write_text('num-rounds = 5\ntask = "sst2"\nlr = 1e-4\n')
    assert launch.run_config_args(cfg, None) == ["--run-config", str(cfg)]
    assert launch.run_config_args(None, None) == []
    overrides = {"num-rounds": 1, "run-name": 'a "b"', "federated-eval": True, "data": "/tmp/x y"}
    flag, value = launch.run_config_args(cfg, overrides)
    assert flag == "--run-config"
    assert parse_config_args([value]) == {"num-rounds": 1, "task": "sst2", "lr": 1e-4, "run-name": 'a "b"',
                                          "federated-eval": True, "data": "/tmp/x y"}
    with pytest.raises(ValueError, match="both"):
        launch.run_config_args(None, {"run-name": "it's \"x\""})
    with pytest.raises(ValueError, match="num-roundz"):
        launch.run_config_args(cfg, {"num-roundz": 1})


def test_stop_process_tree_kills_group_without_survivors() -> None:
    proc = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    pids = _wait_for_children(proc.pid, 3)
    processes.stop_process_tree(proc, timeout=5)
    assert proc.returncode is not None
    assert all(_gone(p) for p in pids), processes.describe({p for p in pids if not _gone(p)})


def test_stop_process_tree_finds_orphans_in_other_sessions_and_sigterm_ignorers() -> None:
    # A grandchild in its own new session that outlives its parent (like flower-superexec, Ray's daemons),
    # and a child that ignores SIGTERM (needs the SIGKILL step). None would end by itself while the test runs, so
    # waiting instead of escalating either leaves them running or hangs into the test's timeout: no clock needed.
    script = ("setsid sleep 3600 & "
              "bash -c 'trap \"\" TERM; sleep 3600; true' & "
              "sleep 3600")
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    pids = _wait_for_children(proc.pid, 4)
    try:
        processes.stop_process_tree(proc, timeout=1)
        assert all(_gone(p) for p in pids), processes.describe({p for p in pids if not _gone(p)})
    finally:
        for p in pids:  # whatever the outcome, leave none of what this test started running
            if not _gone(p):
                os.kill(p, signal.SIGKILL)


def test_stop_process_tree_on_exited_process_is_a_no_op() -> None:
    proc = subprocess.Popen(["true"], start_new_session=True)
    proc.wait()
    processes.stop_process_tree(proc, timeout=1)
    assert proc.returncode == 0


def test_run_simulation_refuses_someone_elses_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", str(listener.getsockname()[1]))
        monkeypatch.setattr(launch.subprocess, "Popen", lambda *a, **k: pytest.fail("started"))
        with pytest.raises(RuntimeError, match="already listening"):
            launch.run_simulation(None, 2, overrides={"num-rounds": 1})


def test_run_simulation_stops_superlink_tree_on_sigterm(monkeypatch: pytest.MonkeyPatch) -> None:
    import signal

    started: list[subprocess.Popen] = []

    def fake_superlink(project_dir: Path, env: dict[str, str]) -> subprocess.Popen:
        started.append(subprocess.Popen(["bash", "-c", "setsid sleep 60 & sleep 60"], start_new_session=True))
        return started[-1]

    def fake_flwr_run(*args: object, **kwargs: object) -> int:
        _wait_for_children(started[0].pid, 3)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        return 0

    monkeypatch.setattr(launch, "start_local_superlink", fake_superlink)
    monkeypatch.setattr(launch, "flwr_run", fake_flwr_run)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exc:
        launch.run_simulation(None, 2, overrides={"num-rounds": 1})
    assert exc.value.code == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored
    assert started and started[0].returncode is not None
    assert not processes.process_tree(started[0].pid)
