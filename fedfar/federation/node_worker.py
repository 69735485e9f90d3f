"""A node's warm worker: one long-lived process beside each SuperNode that keeps torch, transformers, the model
and the node's partition in memory between messages.

Flower 1.41 runs every message a SuperNode receives in a fresh `flwr-clientapp` process, and importing torch and
transformers alone costs that process 5-6 s on a small CPU before it can train. With node config
`worker="<socket path>"` the ClientApp imports only Flower and this module, hands the message's content to the
node's worker over a Unix socket and replies with what the worker returns: the worker paid its imports once, when
the node started. Start it beside the SuperNode, as the same user (docs/deployment.md):

    fedfar node-worker --socket ~/.fedfar/worker.sock

Only processes that can read the key the worker writes beside its socket (`<socket>.key`, 0600) may connect:
multiprocessing's HMAC handshake proves it before anything is unpickled. If the worker cannot be reached (not
started, stopped, killed mid-message) the ClientApp runs the message itself and logs why: slower, nothing lost.
An error raised by the work itself (a crash the run injected, a bug) fails the message, as it would in-process.
"""
from __future__ import annotations

import os
import secrets
import signal
import socket as sockets
import sys
import time
import traceback
from logging import WARNING
from multiprocessing.connection import AuthenticationError, Client, Connection, Listener
from pathlib import Path

from flwr.app import Context, RecordDict
from flwr.common.logger import log

from . import coldstart

MAX_SOCKET_PATH = 100  # bytes; Linux allows 107 for a Unix socket's path (macOS 103)


class WorkerUnavailable(RuntimeError):
    """The node's worker could not be reached or went away before replying: run the message here instead."""


def key_path(socket: Path) -> Path:
    return Path(f"{socket}.key")


def handle(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """One message's reply records: by the node's worker if node config `worker` names one and it answers,
    otherwise in this process."""
    if address := context.node_config.get("worker"):
        try:
            return forward(Path(str(address)).expanduser(), kind, content, context)
        except WorkerUnavailable as err:
            log(WARNING, "fedfar: %s; running this %s message in the ClientApp process instead", err, kind)
    from ..models import quiet_libraries
    from .client import handle as run_here

    quiet_libraries()  # per-map and per-file bars from every worker bury the round log
    return run_here(kind, content, context.run_config, context.node_config, context.state)


def forward(socket: Path, kind: str, content: RecordDict, context: Context) -> RecordDict:
    """Send one message's content to the worker at `socket`; return its reply records (the node's state, which
    local masks write to, comes back too). Raises WorkerUnavailable if the worker cannot serve it, RuntimeError
    if the work itself failed."""
    try:
        conn = Client(str(socket), family="AF_UNIX", authkey=key_path(socket).read_bytes())
    except (OSError, EOFError, AuthenticationError) as err:
        raise WorkerUnavailable(f"no node worker at {socket} ({type(err).__name__}: {err})") from err
    with conn:
        try:
            conn.send({"kind": kind, "content": content, "run-config": dict(context.run_config),
                       "node-config": dict(context.node_config), "state": context.state,
                       "coldstart": coldstart.snapshot()})
            answer = conn.recv()
        except (OSError, EOFError) as err:
            raise WorkerUnavailable(f"the node worker at {socket} went away before replying "
                                    f"({type(err).__name__}: {err})") from err
    if answer[0] != "ok":
        log(WARNING, "fedfar: the node worker at %s failed on a %s message:\n%s", socket, kind, answer[1])
        raise RuntimeError(f"node worker: {answer[1].strip().splitlines()[-1]}")
    _, reply, state = answer
    for name in state.keys():
        context.state[name] = state[name]
    return reply


def serve(socket: Path, ready: str = "") -> None:
    """Serve messages on `socket` until SIGTERM or SIGINT, one at a time (a node trains one message at a time).
    `ready`: a file written once the worker accepts connections (for scripts that wait for it)."""
    socket = Path(socket).expanduser().absolute()
    if len(os.fsencode(str(socket))) > MAX_SOCKET_PATH:
        raise ValueError(f"--socket {socket} is {len(os.fsencode(str(socket)))} bytes long; a Unix socket's path "
                         f"must be at most {MAX_SOCKET_PATH}: choose a shorter path (e.g. ~/.fedfar/worker.sock)")
    if not socket.parent.is_dir():
        raise FileNotFoundError(f"--socket {socket}: its folder {socket.parent} does not exist; create it first")
    if socket.exists():
        if _answers(socket):
            raise RuntimeError(f"a node worker already serves {socket}: stop it first, or choose another --socket")
        socket.unlink()  # left by a worker that was killed
    from ..models import quiet_libraries
    from . import client  # the imports every message would otherwise pay, paid once

    quiet_libraries()
    key = secrets.token_bytes(32)
    key_path(socket).unlink(missing_ok=True)
    umask = os.umask(0o077)  # the key and the socket: this user only
    try:
        key_path(socket).write_bytes(key)
        listener = Listener(str(socket), family="AF_UNIX", authkey=key)
    finally:
        os.umask(umask)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # unwinds to `finally`: the socket and key go
    try:
        if ready:
            Path(ready).write_text(f"{os.getpid()}\n")
        print(f"fedfar node worker (pid {os.getpid()}): serving {socket}", flush=True)
        while True:
            try:
                conn = listener.accept()
            except (AuthenticationError, OSError, EOFError) as err:  # a peer without the key, or one that left
                print(f"fedfar node worker: refused a connection ({type(err).__name__}: {err})", flush=True)
                continue
            with conn:
                _serve_one(conn, client.handle)
    except KeyboardInterrupt:
        pass
    finally:
        listener.close()  # removes the socket
        key_path(socket).unlink(missing_ok=True)


def _serve_one(conn: Connection, run) -> None:
    try:
        request = conn.recv()
    except (OSError, EOFError):
        return  # the ClientApp process went away (its run was stopped)
    start = time.time()
    try:
        coldstart.adopt(request["coldstart"])  # the figures count from the ClientApp process's start
        state = request["state"]
        reply = run(request["kind"], request["content"], request["run-config"], request["node-config"], state)
        if "metrics" in reply:
            reply["metrics"]["worker-s"] = time.time() - start
        answer = ("ok", reply, state)
    except Exception:  # noqa: BLE001 - the message fails, the worker serves the next one
        answer = ("error", traceback.format_exc())
    try:
        conn.send(answer)
    except (OSError, EOFError):
        pass


def _answers(socket: Path) -> bool:
    """Whether a process accepts connections on `socket` (a live worker), not just a file left behind."""
    with sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM) as probe:
        try:
            probe.connect(str(socket))
        except OSError:
            return False
    return True
