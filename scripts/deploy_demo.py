#!/usr/bin/env python
"""A real Flower deployment on loopback: one SuperLink, two SuperNodes (partitions 0 and 1), one tiny fedfar run.

    .venv/bin/python scripts/deploy_demo.py                      # 1 round, 64 train examples/client, 128 dev
    .venv/bin/python scripts/deploy_demo.py --set num-rounds=2 --set 'task="sst2"'
    .venv/bin/python scripts/deploy_demo.py --run-config configs/x.toml --full
    .venv/bin/python scripts/deploy_demo.py --certs certs/       # keys from `fedfar certs --out certs --supernodes 2`
    .venv/bin/python scripts/deploy_demo.py --insecure           # lab only: no TLS, any SuperNode may join
    .venv/bin/python scripts/deploy_demo.py --set num-rounds=2 --cold-starts   # + each message's cold start

Secure by default, as a real deployment should be (docs/deployment.md): the SuperLink serves TLS with a
certificate from a CA and admits only SuperNodes whose public key was registered with `flwr supernode register`;
each SuperNode verifies the SuperLink against the CA and signs its requests with its own ECDSA P-384 key. Without
--certs a fresh CA and keys are generated in .flwr/deploy-demo/certs/.

Unlike the simulation there is no Ray: each SuperNode runs every ClientApp call as a fresh process. Beside each
SuperNode runs its warm worker (`fedfar node-worker`, node config worker=<socket>): the fresh ClientApp process
imports only Flower and hands the message to it, so torch, transformers and the model are loaded once per node,
not once per message (--no-worker: every message in its own ClientApp process, as plain Flower does). All
servers bind 127.0.0.1 on ports free at start-up (the workers: a Unix socket in the node's cache folder), keep
their state and logs under .flwr/deploy-demo/, and are stopped by process id (with everything they spawned)
however the run ends. Exit code: 0 if the run completed.

`--cold-starts`: after the run, a table of every message's cold start (process start to its first training or
evaluation step, from the ledger, split into Flower's start-up, this app's imports and opening the job) beside
the import floor measured in the same run: fresh processes of this interpreter, two at a time as the two SuperNodes
start theirs, importing torch, transformers and flwr.clientapp (and, second floor, also the BERT model class: what
any ClientApp that builds the model must import).
Written to <results>/coldstart.json.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
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
from fedfar.federation import certs, deploy, launch, processes  # noqa: E402
from fedfar.devices.profiles import load_catalog  # noqa: E402

CONNECTION = "fedfar-demo"
NUM_NODES = 2
# Small enough for ~2-4 min on 2 cores, yet a full round trip: priming, one round of training, evaluation.
TINY = {"num-rounds": 1, "max-train-examples": 64, "dev-examples": 128, "batch-size": 16}


def node_config(i: int, devices: list[str], cache: Path, worker: Path | None = None) -> str:
    """What a real SuperNode is started with: its partition, its disk cache (tokenized partition, device plan),
    its warm worker's socket and, optionally, which device it is."""
    device = f" device='{devices[i]}'" if devices else ""
    socket = f" worker='{worker}'" if worker else ""
    return f"partition-id={i} num-partitions={NUM_NODES} cache-dir='{cache}'{socket}{device}"


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


def results_folder(run_log: Path, project: Path) -> Path | None:
    """The folder the ServerApp named in its summary ("results  <path>"), relative to the SuperLink's cwd."""
    if not run_log.is_file():
        return None
    found = re.findall(r"results\s+(\S+)\s+\(config\.json", launch.ANSI.sub("", run_log.read_text(errors="replace")))
    return (project / found[-1]).resolve() if found else None


FLOORS = {  # what a fresh Python process must import before any ClientApp can train
    "torch + transformers + flwr.clientapp": "import torch, transformers, flwr.clientapp",
    "... + the BERT model class": "import torch, transformers, flwr.clientapp; "
                             "from transformers import AutoModelForSequenceClassification, BertModel",
}


def import_floor(code: str, repeats: int, together: int = NUM_NODES) -> float:
    """Median wall seconds of a fresh `python -c code` (start to exit), as a ClientApp process pays it: `together`
    processes at once, as the demo's SuperNodes start theirs at once on this one machine."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        procs = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(together)]
        for proc in procs:
            if proc.wait() != 0:
                raise RuntimeError(f"python -c {code!r} failed with exit code {proc.returncode}")
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def cold_start_report(folder: Path, repeats: int = 3) -> dict:
    """Every ledger message that reported a cold start, with the import floors measured now; printed and written
    to <folder>/coldstart.json."""
    rows = [json.loads(line) for line in (folder / "ledger.jsonl").read_text().splitlines() if line.strip()]
    messages = [{k: r[k] for k in ("round", "phase", "partition_id", "boot_s", "import_s", "to_step_s",
                                   "cold_start_s", "worker_s") if k in r} for r in rows if "cold_start_s" in r]
    floors = {name: import_floor(code, repeats) for name, code in FLOORS.items()}
    print(f"\ncold starts ({len(messages)} messages): process start -> first training/evaluation step, seconds")
    print(f"{'round':>5} {'phase':<9} {'node':>4} {'Flower':>7} {'imports':>8} {'open':>6} {'total':>7}  served by")
    for m in messages:
        print(f"{m['round']:>5} {m['phase']:<9} {m['partition_id']:>4} {m['boot_s']:>7.1f} {m['import_s']:>8.1f} "
              f"{m['to_step_s']:>6.1f} {m['cold_start_s']:>7.1f}  "
              + ("the node's worker" if "worker_s" in m else "the ClientApp process"))
    report: dict = {"messages": messages, "floors_s": floors, "floor_repeats": repeats}
    if messages:
        median = statistics.median(m["cold_start_s"] for m in messages)
        report["median_cold_start_s"] = median
        report["above_floor_s"] = {name: median - f for name, f in floors.items()}
        print(f"median {median:.1f} s; import floor (median of {repeats} x {NUM_NODES} fresh processes, "
              f"{NUM_NODES} at a time, this run):")
        for name, f in floors.items():
            print(f"  {name:<40} {f:5.1f} s   cold start - floor = {median - f:+.1f} s")
    (folder / "coldstart.json").write_text(json.dumps(report, indent=1))
    return report


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
    p.add_argument("--certs", metavar="DIR",
                   help="a `fedfar certs` folder (ca.crt, server.crt/.key, supernode-<i>.key/.pub for i < "
                        f"{NUM_NODES}); default: a fresh one in .flwr/deploy-demo/certs")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS and no SuperNode authentication (Flower's --insecure): a lab-only opt-in")
    p.add_argument("--no-worker", action="store_true",
                   help="no warm node workers: every message runs in its own fresh ClientApp process")
    p.add_argument("--cold-starts", action="store_true",
                   help="after the run, report each message's cold start beside the import floor, measured now")
    args = p.parse_args(argv)
    if args.insecure and args.certs:
        raise SystemExit("--insecure and --certs exclude each other")

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
    keys = None if args.insecure else secure_files(args.certs, demo)  # checked before anything starts or changes
    ca = keys.ca_cert if keys else None
    demo.mkdir(parents=True, exist_ok=True)
    for old in demo.glob("state.db*"):  # a fresh federation: no offline nodes from an earlier demo
        old.unlink()
    for old in demo.glob("cache-*"):  # and nodes with empty disks, so each demo measures the same thing
        shutil.rmtree(old)
    run_config = launch.run_config_args(config, overrides, project)

    procs: list[subprocess.Popen] = []
    t0 = time.monotonic()
    with processes.SignalGuard() as guard:
        try:
            port = launch.free_port()
            link_log = demo / "superlink.log"
            procs.append(deploy.start_server(deploy.superlink_command(port, demo / "state.db", keys),
                                             env, project, link_log))
            launch.wait_healthy(procs[0], port, "flower-superlink", [link_log], ca=ca)
            connection = deploy.write_connection(home, CONNECTION, f"127.0.0.1:{port}", ca)
            print(f"SuperLink on 127.0.0.1:{port} (pid {procs[0].pid}, "
                  + ("INSECURE: no TLS, no SuperNode auth" if keys is None else "TLS + SuperNode auth")
                  + f"); connection [superlink.{CONNECTION}] in {connection}", flush=True)
            if keys is not None:  # admit exactly our nodes, before they start
                for i in range(NUM_NODES):
                    node_id = deploy.register_supernode(keys.node_pub(i), CONNECTION, env, project)
                    print(f"registered {keys.node_pub(i)} as node {node_id}", flush=True)

            sockets: list[Path | None] = [None] * NUM_NODES
            if not args.no_worker:  # started first: their imports overlap the SuperNodes' start
                ready, worker_logs = [], []
                for i in range(NUM_NODES):
                    (demo / f"cache-{i}").mkdir()
                    sockets[i], ready_file = demo / f"cache-{i}" / "worker.sock", demo / f"cache-{i}" / "ready"
                    ready.append(ready_file)
                    worker_logs.append(demo / f"worker-{i}.log")
                    procs.append(deploy.start_server(deploy.node_worker_command(sockets[i], ready_file), env,
                                                     project, worker_logs[-1]))
                    print(f"node worker {i} on {sockets[i]} (pid {procs[-1].pid})", flush=True)
            node_logs, used, first_node = [], {port}, len(procs)
            for i in range(NUM_NODES):
                node_port = launch.free_port(used)
                used.add(node_port)
                node_logs.append(demo / f"supernode-{i}.log")
                command = deploy.supernode_command(f"127.0.0.1:{port}", node_port,
                                                   node_config(i, devices, demo / f"cache-{i}", sockets[i]), ca,
                                                   keys.node_key(i) if keys else None)
                procs.append(deploy.start_server(command, env, project, node_logs[-1]))
                print(f"SuperNode {i} on 127.0.0.1:{node_port} (pid {procs[-1].pid})", flush=True)
            deploy.wait_for_nodes(NUM_NODES, CONNECTION, env, project, procs[first_node:], node_logs)
            if not args.no_worker:
                deploy.wait_for_workers(ready, procs[1:first_node], worker_logs)
                print(f"{NUM_NODES} node workers ready after {time.monotonic() - t0:.1f} s", flush=True)
            print(f"{NUM_NODES} SuperNodes online after {time.monotonic() - t0:.1f} s", flush=True)

            run_log = demo / "flwr-run.log"
            code = launch.flwr_run(project, CONNECTION, env, run_config, log_path=run_log)
            folder = results_folder(run_log, project)
            print(f"results folder: {folder}" if folder else f"no results folder reported; see {run_log}")
        finally:
            guard.defer()
            for proc in reversed(procs):  # SuperNodes first, so they do not retry a vanished SuperLink
                processes.stop_process_tree(proc)
            left = set().union(*(processes.process_tree(proc.pid) for proc in procs)) if procs else set()
            print(f"stopped {len(procs)} servers after {time.monotonic() - t0:.1f} s; "
                  + (f"still running:\n{processes.describe(left)}" if left else "no processes left"), flush=True)
    if args.cold_starts and folder is not None:  # after the servers stopped: the floors run on a quiet machine
        cold_start_report(folder)
    return code


def secure_files(folder: str | None, demo: Path) -> certs.CertPaths:
    """The given `fedfar certs` folder, checked file by file, or a fresh CA and keys for this demo."""
    if folder is None:
        return certs.generate(demo / "certs", supernodes=NUM_NODES, overwrite=True)  # state.db is fresh too
    keys = certs.CertPaths(Path(folder).expanduser().resolve())
    try:
        certs.check(keys.ca_cert, keys.server_cert, keys.server_key,
                    [keys.node_key(i) for i in range(NUM_NODES)], [keys.node_pub(i) for i in range(NUM_NODES)],
                    hint=f"run `fedfar certs --out {folder} --supernodes {NUM_NODES}` first")
    except certs.CertError as err:
        raise SystemExit(f"--certs: {err}") from None
    return keys


if __name__ == "__main__":
    sys.exit(main())
