"""The pieces of a real Flower deployment, secure unless asked otherwise: SuperLink and SuperNode command lines,
the connection `flwr` uses, registering a SuperNode's public key, and waiting for nodes to come online.

Secure means Flower's own TLS (the SuperLink serves its certificate; SuperNodes and `flwr` verify it against the
CA) and SuperNode authentication (`--enable-supernode-auth`: only SuperNodes whose public key was registered with
`flwr supernode register` may connect). Passing `certs=None` / `ca=None` gives the `--insecure` lab setup.
Used by scripts/deploy_demo.py and its tests; processes are started by the caller and stopped by process id.
"""
from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from .certs import CertPaths
from .launch import bin_path, flwr_json, tail_logs

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # 3.10: the same parser, as installed with flwr
    import tomli as tomllib  # type: ignore[no-redef]


def superlink_command(port: int, database: Path, certs: CertPaths | None, host: str = "127.0.0.1") -> list[str]:
    """flower-superlink serving the Fleet, Control and Runtime APIs on host:port; with TLS and SuperNode auth
    from `certs`, or `--insecure` if None (Flower refuses auth without TLS)."""
    command = [bin_path("flower-superlink"), "--host", host, "--port", str(port), "--database", str(database),
               "--disable-runtime-dependency-installation"]
    if certs is None:
        return [*command, "--insecure"]
    return [*command, "--ssl-ca-certfile", str(certs.ca_cert), "--ssl-certfile", str(certs.server_cert),
            "--ssl-keyfile", str(certs.server_key), "--enable-supernode-auth"]


def supernode_command(superlink: str, port: int, node_config: str, ca: Path | None, key: Path | None = None,
                      host: str = "127.0.0.1", extra: Sequence[str] = ()) -> list[str]:
    """flower-supernode connecting to `superlink` (host:port): over TLS verified with `ca` and authenticated with
    the private `key`, or `--insecure` if `ca` is None. `port` is its own Runtime API (for its ClientApps)."""
    command = [bin_path("flower-supernode"), "--superlink", superlink, "--host", host, "--port", str(port),
               "--node-config", node_config]
    if ca is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(ca)]
    if key is not None:
        command += ["--auth-supernode-private-key", str(key)]
    return [*command, *extra]


def node_worker_command(socket: Path, ready: Path) -> list[str]:
    """`fedfar node-worker`: the node's warm worker on `socket` (fedfar.federation.node_worker), writing `ready`
    once it accepts connections. Its SuperNode's node config names the same socket as worker=<socket>."""
    return [bin_path("fedfar"), "node-worker", "--socket", str(socket), "--ready-file", str(ready)]


def wait_for_workers(ready: Sequence[Path], procs: Sequence[subprocess.Popen], logs: Sequence[Path],
                     timeout: float = 180.0) -> None:
    """Until every node worker has written its ready file; raise, naming the log, as soon as one exits."""
    deadline = time.monotonic() + timeout
    while not all(path.exists() for path in ready):
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                raise RuntimeError(f"node worker exited with code {proc.returncode}; see {log}" + tail_logs([log]))
        if time.monotonic() > deadline:
            raise RuntimeError(f"node workers not ready after {timeout:.0f} s; see " + ", ".join(map(str, logs))
                               + tail_logs(list(logs)))
        time.sleep(0.2)


def write_connection(flwr_home: Path, name: str, address: str, ca: Path | None) -> Path:
    """Set [superlink.<name>] in $FLWR_HOME/config.toml (created with Flower's defaults if absent): TLS verified
    with `ca` (Flower wants an absolute path and no `insecure` key), or `insecure = true` if None."""
    import tomli_w  # a Flower dependency
    from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

    path = flwr_home / "config.toml"
    text = path.read_text(encoding="utf-8") if path.is_file() else DEFAULT_FLOWER_CONFIG_TOML
    config = tomllib.loads(text)
    entry: dict[str, object] = {"address": address}
    if ca is None:
        entry["insecure"] = True
    else:
        entry["root-certificates"] = str(Path(ca).expanduser().resolve())
    config.setdefault("superlink", {})[name] = entry  # replaced whole: no `insecure` left from an earlier run
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(config), encoding="utf-8")
    return path


def register_supernode(public_key: Path, connection: str, env: Mapping[str, str], cwd: Path) -> int:
    """`flwr supernode register <public key> <connection>`: admit one SuperNode; return its node id."""
    command = [bin_path("flwr"), "supernode", "register", str(public_key), connection, "--format", "json"]
    res = subprocess.run(command, env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=120)
    try:
        data = json.loads(res.stdout)
    except json.JSONDecodeError:
        data = {}
    if res.returncode != 0 or not data.get("success") or "node-id" not in data:
        raise RuntimeError(f"`{' '.join(command)}` failed (exit {res.returncode}): "
                           + (res.stdout + res.stderr).strip()[-1500:])
    return int(data["node-id"])


def node_statuses(connection: str, env: Mapping[str, str], cwd: Path) -> dict[int, str]:
    """node id -> status ("registered", "online", "offline", ...) from `flwr supernode list`."""
    data = flwr_json(["supernode", "list", connection], env, cwd) or {}
    return {int(n["node-id"]): str(n.get("status")) for n in data.get("nodes", [])}


def wait_for_nodes(count: int, connection: str, env: Mapping[str, str], cwd: Path,
                   procs: Sequence[subprocess.Popen], logs: Sequence[Path], timeout: float = 180.0) -> None:
    """Until `count` SuperNodes are online (the ServerApp counts the nodes it sees when it starts); raise, naming
    the log, as soon as one of `procs` exits."""
    deadline = time.monotonic() + timeout
    online = 0
    while time.monotonic() < deadline:
        for proc, log in zip(procs, logs):
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with code {proc.returncode}; see {log}"
                                   + tail_logs([log]))
        online = sum(status == "online" for status in node_statuses(connection, env, cwd).values())
        if online >= count:
            return
        time.sleep(1.0)
    raise RuntimeError(f"only {online}/{count} SuperNodes online after {timeout:.0f} s; see "
                       + ", ".join(map(str, logs)) + tail_logs(list(logs)))


def start_server(command: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> subprocess.Popen:
    """A server in its own session (so its whole tree can be stopped by process id), output to `log` (fresh)."""
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
