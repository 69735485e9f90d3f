#!/usr/bin/env python
"""A real Flower deployment on loopback: one SuperLink, two SuperNodes (partitions 0 and 1), one tiny fedfar run.

    .venv/bin/python scripts/deploy_demo.py                      # 1 round, 64 train examples/client, 128 dev
    .venv/bin/python scripts/deploy_demo.py --set num-rounds=2 --set 'task="sst2"'
    .venv/bin/python scripts/deploy_demo.py --run-config configs/x.toml --full

Unlike the simulation there is no Ray: each SuperNode runs every ClientApp call as a fresh process. All three
servers bind 127.0.0.1 on ports free at start-up, keep their state and logs under .flwr/deploy-demo/, and are
stopped by process id (with everything they spawned) however the run ends. Exit code: 0 if the run completed.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # 3.10: the same parser, as installed with flwr
    import tomli as tomllib  # type: ignore[no-redef]

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without installing
from fedfar.federation import launch, processes  # noqa: E402
from fedfar.devices.profiles import load_catalog  # noqa: E402

CONNECTION = "fedfar-demo"
NUM_NODES = 2
# Small enough for ~2-4 min on 2 cores, yet a full round trip: priming, one round of training, evaluation.
TINY = {"num-rounds": 1, "max-train-examples": 64, "dev-examples": 128, "batch-size": 16}


def node_config(i: int, devices: list[str]) -> str:
    """What a real SuperNode is started with: its partition and, optionally, which device it is."""
    device = f" device='{devices[i]}'" if devices else ""
    return f"partition-id={i} num-partitions={NUM_NODES}{device}"


def parse_set(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE with a TOML value; a bare word that is not TOML is taken as a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value
    return out


def write_connection(flwr_home: Path, port: int) -> Path:
    """Add/refresh [superlink.fedfar-demo] in $FLWR_HOME/config.toml (created with Flower's defaults if absent)."""
    import tomli_w  # a Flower dependency
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    path = flwr_home / "config.toml"
    text = path.read_text(encoding="utf-8") if path.is_file() else DEFAULT_FLOWER_CONFIG_TOML
    config = tomllib.loads(text)
    config.setdefault("superlink", {})[CONNECTION] = {"address": f"127.0.0.1:{port}", "insecure": True}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


def wait_for_nodes(count: int, env: dict[str, str], procs: list[subprocess.Popen], logs: list[Path],
                   timeout: float = 120.0) -> None:
    """Until `count` SuperNodes are online: the ServerApp counts the nodes it sees when it starts."""
    deadline = time.monotonic() + timeout
    online = 0
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode}; see {log}"
                                   + launch.tail_logs([log]))
        data = launch.flwr_json(["supernode", "list", CONNECTION], env, launch.PROJECT_DIR) or {}
        online = sum(1 for n in data.get("nodes", []) if n.get("status") == "online")
        if online >= count:
            return
        time.sleep(1.0)
    raise RuntimeError(f"only {online}/{count} SuperNodes online after {timeout:.0f} s; see "
                       + ", ".join(map(str, logs)))


def results_folder(run_log: Path, project: Path) -> Path | None:
    """The folder the ServerApp named in its summary ("results  <path>"), relative to the SuperLink's cwd."""
    if not run_log.is_file():
        return None
    found = re.findall(r"results\s+(\S+)\s+\(config\.json", launch.ANSI.sub("", run_log.read_text(errors="replace")))
    return (project / found[-1]).resolve() if found else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-config", help="run-config TOML file (default: pyproject's [tool.flwr.app.config])")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config override, TOML value; repeatable; applied after the file and the tiny job")
    p.add_argument("--devices", default="",
                   help="comma-separated device profiles, one per SuperNode (configs/devices.toml), e.g. "
                        "jetson-nano,phone-midrange: each node then checks its memory budget and the ledger gets "
                        "the simulated clock")
    p.add_argument("--full", action="store_true", help="do not apply the tiny-job overrides " + str(TINY))
    args = p.parse_args(argv)

    project = launch.PROJECT_DIR
    config = launch.resolve_config(args.run_config, project)  # fail before starting anything
    overrides = ({} if args.full else dict(TINY)) | parse_set(args.set)
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if devices and len(devices) != NUM_NODES:
        raise SystemExit(f"--devices: give one profile per SuperNode ({NUM_NODES}), got {len(devices)}")
    catalog = load_catalog()
    if unknown := [d for d in devices if d not in catalog]:
        raise SystemExit(f"--devices: unknown profile(s) {unknown}; valid: {', '.join(sorted(catalog))}")
    env = launch.flower_env(project)
    home = Path(env["FLWR_HOME"])
    demo = home / "deploy-demo"
    demo.mkdir(parents=True, exist_ok=True)
    for old in demo.glob("state.db*"):  # a fresh federation: no offline nodes from an earlier demo
        old.unlink()
    run_config = launch.run_config_args(config, overrides, project)

    procs: list[subprocess.Popen] = []
    t0 = time.monotonic()
    with processes.SignalGuard() as guard:
        try:
            port = launch.free_port()
            link_log = demo / "superlink.log"
            procs.append(_start([launch.bin_path("flower-superlink"), "--insecure", "--host", "127.0.0.1",
                                 "--port", str(port), "--database", str(demo / "state.db"),
                                 "--disable-runtime-dependency-installation"], env, project, link_log))
            launch.wait_healthy(procs[0], port, "flower-superlink", [link_log])
            print(f"SuperLink on 127.0.0.1:{port} (pid {procs[0].pid}); connection [superlink.{CONNECTION}] "
                  f"in {write_connection(home, port)}", flush=True)

            node_logs, used = [], {port}
            for i in range(NUM_NODES):
                node_port = launch.free_port(used)
                used.add(node_port)
                node_logs.append(demo / f"supernode-{i}.log")
                procs.append(_start([launch.bin_path("flower-supernode"), "--insecure",
                                     "--superlink", f"127.0.0.1:{port}",
                                     "--host", "127.0.0.1", "--port", str(node_port),
                                     "--node-config", node_config(i, devices)],
                                    env, project, node_logs[-1]))
                print(f"SuperNode {i} on 127.0.0.1:{node_port} (pid {procs[-1].pid})", flush=True)
            wait_for_nodes(NUM_NODES, env, procs[1:], node_logs)
            print(f"{NUM_NODES} SuperNodes online after {time.monotonic() - t0:.1f} s", flush=True)

            run_log = demo / "flwr-run.log"
            code = launch.flwr_run(project, CONNECTION, env, run_config, log_path=run_log)
            folder = results_folder(run_log, project)
            print(f"results folder: {folder}" if folder else f"no results folder reported; see {run_log}")
            return code
        finally:
            guard.defer()
            for proc in reversed(procs):  # SuperNodes first, so they do not retry a vanished SuperLink
                processes.stop_process_tree(proc)
            left = set().union(*(processes.process_tree(proc.pid) for proc in procs)) if procs else set()
            print(f"stopped {len(procs)} servers after {time.monotonic() - t0:.1f} s; "
                  + (f"still running:\n{processes.describe(left)}" if left else "no processes left"), flush=True)


def _start(command: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """A server in its own session (so its whole tree can be stopped), output to `log` (fresh per demo)."""
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


if __name__ == "__main__":
    sys.exit(main())
