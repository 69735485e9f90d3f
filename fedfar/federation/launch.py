"""Process plumbing around `flwr run`: our own local SuperLink, streamed output, and no processes left behind.

`flwr run . local` lazily starts a *detached* `flower-superlink --simulation` (flwr/cli/local_superlink.py) that
outlives the command, with flower-superexec, flwr-simulation and Ray's gcs_server/raylet/workers under it. Here
we start that same SuperLink ourselves, as our child in a new session, so `flwr run` reuses it and we can stop
the whole tree by process id when the run ends, fails or is interrupted.
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.common.config import flatten_dict

from .processes import SignalGuard, stop_process_tree

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # 3.10: the same parser, as installed with flwr
    import tomli as tomllib  # type: ignore[no-redef]

PROJECT_DIR = Path(__file__).resolve().parents[2]

# Child processes must find the venv's console scripts (flower-superlink spawns `flower-superexec`, which spawns
# `flwr-simulation`, by name via PATH) even when this interpreter was started as `.venv/bin/python`, unactivated.
_BIN_DIR = Path(sys.executable).parent

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_STARTED_RUN = re.compile(r"Successfully started run (\d+)")

LOCAL_STARTUP_TIMEOUT = 60.0  # flwr allows 15 s; importing flwr on 2 busy cores can take longer
RUN_STATUS_TIMEOUT = 60.0     # after the log stream ends, how long to wait for the run to report "finished"


# --------------------------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------------------------


def flower_env(project_dir: Path = PROJECT_DIR) -> dict[str, str]:
    """os.environ plus what every flwr / flower-* process of this project needs."""
    project_dir = Path(project_dir).resolve()
    env = dict(os.environ)
    env.update({
        # Flower's state, config.toml, installed FABs and logs stay inside the project, not in ~/.flwr.
        "FLWR_HOME": str(project_dir / ".flwr"),
        # Otherwise every run `uv sync`s the app's dependencies (a multi-GB CUDA torch) into a fresh env.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # Ray binds every interface unless told this is not a multi-machine cluster; then 127.0.0.1 only.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
        # Log lines reach us through pipes: do not let Python buffer them until exit.
        "PYTHONUNBUFFERED": "1",
    })
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")  # HF_HUB_OFFLINE is deliberately left to the user
    env["PATH"] = os.pathsep.join([str(_BIN_DIR), env.get("PATH", "")]).rstrip(os.pathsep)
    # flwr talks HTTP to 127.0.0.1; a proxy configured for PyPI must not see that traffic.
    for key in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in env.get(key, "").split(",") if h]
        env[key] = ",".join(hosts + [h for h in ("127.0.0.1", "localhost") if h not in hosts])
    return env


def _local_ports(env: Mapping[str, str]) -> tuple[int, int]:
    """(HTTP API port, control port) of flwr's managed local SuperLink; flwr honours the same two variables."""
    return (int(env.get("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "39091")),
            int(env.get("FLWR_LOCAL_CONTROL_API_PORT", "39093")))


def bin_path(name: str) -> str:
    path = _BIN_DIR / name
    return str(path) if path.exists() else name


# --------------------------------------------------------------------------------------------------------------
# SuperLink and `flwr run`
# --------------------------------------------------------------------------------------------------------------


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port(exclude: set[int] | None = None) -> int:
    """A port the OS says is free on 127.0.0.1 right now."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in (exclude or set()):
            return port


def superlink_healthy(port: int, host: str = "127.0.0.1", ca: Path | None = None) -> bool:
    """Does a SuperLink answer on http://host:port/health, or https:// verified with the CA certificate `ca`
    (a TLS SuperLink gives plain HTTP an empty reply)? No proxy: the request must stay on loopback."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if ca is not None:
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(ca))))
    opener = urllib.request.build_opener(*handlers)
    scheme, timeout = ("https", 2.0) if ca else ("http", 0.5)  # a TLS handshake on busy cores takes longer
    try:
        with opener.open(f"{scheme}://{host}:{port}/health", timeout=timeout) as res:
            return 200 <= res.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_healthy(proc: subprocess.Popen, port: int, what: str, logs: list[Path],
                 timeout: float = LOCAL_STARTUP_TIMEOUT, ca: Path | None = None) -> None:
    """Block until `proc` answers /health on `port` (over TLS verified with `ca` if given); raise (naming its
    logs) if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready; see "
                               + ", ".join(map(str, logs)) + tail_logs(logs))
        if superlink_healthy(port, ca=ca):
            return
        time.sleep(0.2)
    scheme = "https" if ca else "http"
    raise RuntimeError(f"{what} did not answer {scheme}://127.0.0.1:{port}/health within {timeout:.0f} s; see "
                       + ", ".join(map(str, logs)) + tail_logs(logs))


def tail_logs(logs: list[Path], n: int = 15) -> str:
    out = []
    for log in logs:
        if log.is_file():
            lines = log.read_text(errors="replace").splitlines()[-n:]
            if lines:
                out.append(f"\n--- last lines of {log} ---\n" + "\n".join(lines))
    return "".join(out)


def start_local_superlink(project_dir: Path, env: Mapping[str, str]) -> subprocess.Popen:
    """flwr's own managed local SuperLink, but as our child (new session) so we can stop it and all it spawns."""
    http_port, control_port = _local_ports(env)
    if port_in_use(http_port):
        who = "a Flower SuperLink" if superlink_healthy(http_port) else "another process"
        raise RuntimeError(
            f"{who} is already listening on 127.0.0.1:{http_port}, the port of flwr's local SuperLink. It is not "
            "ours, so it is left alone: stop it (e.g. a detached `flower-superlink --simulation` left by a plain "
            "`flwr run`; find it with `ps -ef | grep flower-superlink`), or set FLWR_LOCAL_SUPERLINK_HTTP_API_PORT "
            "to another port.")
    run_dir = Path(env["FLWR_HOME"]) / "local-superlink"
    run_dir.mkdir(parents=True, exist_ok=True)
    log_file, console_file = run_dir / "superlink.log", run_dir / "superlink.console.log"
    # Same command line as flwr/cli/local_superlink.py::_start_local_superlink (flwr 1.41).
    command = [
        bin_path("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
        "--control-api-address", f"127.0.0.1:{control_port}",
        "--host", "127.0.0.1", "--port", str(http_port),
        "--log-file", str(log_file), "--log-rotation-interval-hours", "24", "--log-rotation-backup-count", "7",
        "--database", str(run_dir / "state.db"),
    ]
    # flwr discards the console; keep it, since crashes before logging is set up and Ray's output land there.
    with open(console_file, "ab") as console:
        proc = subprocess.Popen(command, env=dict(env), cwd=project_dir, stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(proc, http_port, "the local simulation SuperLink", [log_file, console_file])
    except BaseException:
        stop_process_tree(proc)
        raise
    return proc


def flwr_json(args: list[str], env: Mapping[str, str], project_dir: Path) -> dict[str, Any] | None:
    res = subprocess.run([bin_path("flwr"), *args, "--format", "json"], env=dict(env), cwd=project_dir,
                         capture_output=True, text=True, timeout=60)
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError:
        return None


def run_status(run_id: int, connection: str, env: Mapping[str, str], project_dir: Path) -> tuple[str, str]:
    """(status, details) of a run, e.g. ("finished:completed", "") or ("running", "")."""
    data = flwr_json(["ls", connection, "--run-id", str(run_id)], env, project_dir)
    runs = (data or {}).get("runs") or []
    if not runs:
        return "unknown", f"flwr ls gave no run {run_id}: {data}"
    return str(runs[0].get("status", "unknown")), str(runs[0].get("status-details", ""))


def flwr_run(project_dir: Path, connection: str, env: Mapping[str, str], run_config: list[str],
             federation_config: str | None = None, stream: bool = True, log_path: Path | None = None) -> int:
    """`flwr run <project> <connection> --stream`; return 0 only if the run itself finished as completed.

    `run_config`: `--run-config` arguments (`run_config_args`). `flwr run --stream` exits 0 once the log stream ends, whether the ServerApp completed or raised, so the run's
    final status is read with `flwr ls` as well. Output goes to our stdout (if `stream`) and to `log_path`.
    """
    command = [bin_path("flwr"), "run", str(project_dir), connection, *run_config]
    if federation_config:
        command += ["--federation-config", federation_config]
    command.append("--stream")
    print("$ " + " ".join(command), flush=True)
    run_id = None
    log = open(log_path, "w", encoding="utf-8") if log_path else None  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(command, env=dict(env), cwd=project_dir, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            bufsize=1, start_new_session=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if stream:
                sys.stdout.write(line)
                sys.stdout.flush()
            if log:
                log.write(line)
            if run_id is None and (m := _STARTED_RUN.search(ANSI.sub("", line))):
                run_id = int(m.group(1))
        code = proc.wait()
    finally:
        stop_process_tree(proc, timeout=5)  # a no-op after a normal exit; on an interrupt, flwr goes too
        if proc.stdout:
            proc.stdout.close()
        if log:
            log.close()
    if code != 0:
        print(f"flwr run exited with code {code}", file=sys.stderr, flush=True)
        return code
    if run_id is None:
        print("flwr run printed no run id; cannot tell whether the run succeeded", file=sys.stderr, flush=True)
        return 1
    deadline = time.monotonic() + RUN_STATUS_TIMEOUT
    status, details = run_status(run_id, connection, env, project_dir)
    while not status.startswith("finished") and time.monotonic() < deadline:
        time.sleep(1.0)
        status, details = run_status(run_id, connection, env, project_dir)
    print(f"run {run_id}: {status}" + (f" ({details})" if details not in ("", "N/A") else ""), flush=True)
    return 0 if status == "finished:completed" else 1


# --------------------------------------------------------------------------------------------------------------
# Run configuration
# --------------------------------------------------------------------------------------------------------------


def _toml_value(key: str, v: object) -> str:
    """One value as `flwr run --run-config "k=v ..."` parses it (a TOML value; strings quoted)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
    if isinstance(v, str):
        if '"' not in v and "\\" not in v:
            return f'"{v}"'
        if "'" not in v:
            return f"'{v}'"  # a TOML literal string: backslashes and double quotes as they are
        raise ValueError(f"run-config {key} = {v!r}: a value cannot hold both ' and \" (flwr's --run-config)")
    raise TypeError(f"run-config values must be bool, int, float or str, not {type(v).__name__}: {key} = {v!r}")


def app_config_defaults(project_dir: Path = PROJECT_DIR) -> dict[str, Any]:
    """The flat [tool.flwr.app.config] of the project's pyproject.toml."""
    with open(Path(project_dir) / "pyproject.toml", "rb") as f:
        return flatten_dict(tomllib.load(f).get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def resolve_config(config: str | Path | None, project_dir: Path = PROJECT_DIR) -> Path | None:
    """The config file as an absolute path; relative paths are tried against the cwd, then the project."""
    if config is None:
        return None
    path = Path(config).expanduser()
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, Path(project_dir) / path]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"run config file not found: {config} (looked at "
                            + ", ".join(str(c) for c in dict.fromkeys(candidates)) + ")")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return flatten_dict(tomllib.load(f))
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"run config {path}: not valid TOML: {err}") from None


def run_config_values(config: str | Path | None, overrides: Mapping[str, object] | None = None,
                      project_dir: Path = PROJECT_DIR) -> dict[str, Any]:
    """The run config Flower will hand the app: pyproject defaults, then the file, then the overrides."""
    values = app_config_defaults(project_dir)
    path = resolve_config(config, project_dir)
    if path is not None:
        values.update(_read_toml(path))
    values.update(overrides or {})
    return values


def run_config_args(config: Path | None, overrides: Mapping[str, object] | None,
                    project_dir: Path = PROJECT_DIR) -> list[str]:
    """The `--run-config` arguments of `flwr run`: a TOML path as it is, or (flwr takes a file or "k=v" pairs,
    never both) the file's keys and the overrides as one "k=v ..." string. Keys are checked against the app's
    defaults here, before any process starts: Flower would only reject an unknown key inside the simulation."""
    values = _read_toml(config) if config is not None else {}
    values.update(overrides or {})
    valid = app_config_defaults(project_dir)
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ValueError(f"unknown run-config key(s) {unknown} (from {config or 'overrides'}); "
                         f"valid keys ([tool.flwr.app.config]): {', '.join(sorted(valid))}")
    if not overrides:
        return ["--run-config", str(config)] if config is not None else []
    return ["--run-config", " ".join(f"{k}={_toml_value(k, v)}" for k, v in values.items())]


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def run_simulation(config: str | Path | None, num_supernodes: int, cpus_per_client: float = 1.0,
                   overrides: dict[str, object] | None = None, project_dir: Path = PROJECT_DIR,
                   stream: bool = True, gpus_per_client: float = 0.0, ray_address: str = "") -> int:
    """Run the Flower app as a local Ray simulation and return 0 only if the run completed.

    `config`: a run-config TOML (None = pyproject defaults); `overrides`: run-config keys on top of it.
    `cpus_per_client`: Ray CPUs per ClientApp; Flower 1.41 accepts whole numbers only. `gpus_per_client`: Ray's
    GPU share per ClientApp (0: clients see no GPU), for runs with device = "cuda". `ray_address`: run the
    ClientApps on an existing Ray cluster (`<head ip>:<port>`, what `ray start --head` printed) instead of a
    Ray instance of their own; it reaches Flower's Ray backend as RAY_ADDRESS.
    `stream=False` keeps flwr's output off stdout; it is always in .flwr/local-superlink/flwr-run.log.
    Returns flwr's exit code if it failed, else 0/1 from the run's final status (see `flwr_run`).
    Every process started here (SuperLink, superexec, flwr-simulation, Ray) is stopped before returning.
    """
    project_dir = Path(project_dir).resolve()
    config_path = resolve_config(config, project_dir)  # before anything starts
    if num_supernodes < 1:
        raise ValueError(f"num_supernodes must be >= 1, got {num_supernodes}")
    if cpus_per_client <= 0 or float(cpus_per_client) != int(cpus_per_client):
        raise ValueError(f"cpus_per_client must be a positive whole number in Flower 1.41 "
                         f"(client-resources-num-cpus is an integer), got {cpus_per_client}")
    if gpus_per_client < 0:
        raise ValueError(f"gpus_per_client must be >= 0, got {gpus_per_client}")
    run_config = run_config_args(config_path, overrides, project_dir)
    env = flower_env(project_dir)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    federation = f"num-supernodes={int(num_supernodes)} client-resources-num-cpus={int(cpus_per_client)}"
    if gpus_per_client:
        federation += f" client-resources-num-gpus={float(gpus_per_client)}"
    with SignalGuard() as guard:
        superlink = None
        try:
            superlink = start_local_superlink(project_dir, env)
            return flwr_run(project_dir, "local", env, run_config, federation, stream=stream,
                            log_path=Path(env["FLWR_HOME"]) / "local-superlink" / "flwr-run.log")
        finally:
            guard.defer()
            if superlink is not None:
                stop_process_tree(superlink)
