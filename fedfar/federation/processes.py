"""Stopping what we start, by process id: a process, every process it spawned, and the ones they orphaned.

flower-superlink starts flower-superexec in a new session, and Ray's daemons are re-parented to init once
flwr-simulation dies, so walking parent links is not enough: members of a process group or session one of ours
created are ours too. Nothing is ever signalled by name.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any




def _process_table() -> dict[int, tuple[int, int, int, str]]:
    """pid -> (ppid, pgid, sid, state) of every visible process."""
    table: dict[int, tuple[int, int, int, str]] = {}
    if os.path.exists("/proc/self/stat"):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(os.path.join(entry.path, "stat"), encoding="utf-8", errors="replace") as f:
                    raw = f.read()
            except OSError:  # exited while we looked
                continue
            fields = raw[raw.rfind(")") + 2:].split()  # the command name may contain spaces and parentheses
            table[int(entry.name)] = (int(fields[1]), int(fields[2]), int(fields[3]), fields[0])
        return table
    out = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,pgid=,stat="], capture_output=True, text=True).stdout
    for line in out.splitlines():
        pid, ppid, pgid, stat = line.split()[:4]
        table[int(pid)] = (int(ppid), int(pgid), 0, stat[:1])  # no session ids from portable ps
    return table


def _owned(root: int, known: set[int], table: Mapping[int, tuple[int, int, int, str]]) -> set[int]:
    """`root`, its descendants, and everything in a process group or session one of them created.

    Walking parent links alone is not enough: flower-superlink starts flower-superexec in a new session and Ray's
    daemons are re-parented to init once flwr-simulation dies, but they keep the session/group id, which is the
    pid of the member that created it.
    """
    me = os.getpid()
    owned = set(known) | {root}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, pgid, sid, _) in table.items():
            if pid in owned or pid == me:
                continue
            if ppid in owned or pgid in owned or sid in owned:
                owned.add(pid)
                changed = True
    return owned


def _alive(pids: set[int], table: Mapping[int, tuple[int, int, int, str]]) -> set[int]:
    return {p for p in pids if p in table and table[p][3] not in ("Z", "X")}  # zombies are already dead


def process_tree(pid: int) -> set[int]:
    """Live pids of `pid`'s tree (see `_owned`), for checks such as "nothing is left"."""
    table = _process_table()
    return _alive(_owned(pid, set(), table), table)


def describe(pids: set[int]) -> str:
    """'pid: command line' per process, for error messages."""
    lines = []
    for pid in sorted(pids):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            cmd = "?"
        lines.append(f"  {pid}: {cmd[:160]}")
    return "\n".join(lines)


def _signal(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop_process_tree(proc: subprocess.Popen, timeout: float = 10) -> None:
    """Stop `proc` and every process it started: SIGTERM, up to `timeout` s, then SIGKILL.

    Only processes found from `proc.pid` are signalled (never by name). Works best when `proc` was started with
    `start_new_session=True`, so that its session id marks its descendants even after they are orphaned.
    """
    known: set[int] = set()

    def scan() -> set[int]:
        proc.poll()  # reap our direct child, so it does not linger as a zombie
        table = _process_table()
        known.update(_owned(proc.pid, known, table))
        return _alive(known, table)

    signalled: set[int] = set()
    alive = scan()
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        _signal(alive - signalled, signal.SIGTERM)  # new members (spawned during shutdown) get theirs too
        signalled |= alive
        time.sleep(0.1)
        alive = scan()
    deadline = time.monotonic() + 5.0
    while alive and time.monotonic() < deadline:
        _signal(alive, signal.SIGKILL)
        time.sleep(0.1)
        alive = scan()
    try:
        proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        pass
    if alive:  # only processes stuck in the kernel survive SIGKILL; say so rather than raise from a cleanup path
        print(f"warning: processes of {proc.args!r} survived SIGKILL:\n{describe(alive)}", file=sys.stderr)


class SignalGuard:
    """SIGTERM/SIGINT become exceptions while working (so `finally` runs), and wait while cleaning up."""

    def __init__(self) -> None:
        self._active = threading.current_thread() is threading.main_thread()  # signal() only works there
        self._old: dict[int, Any] = {}
        self._deferring = False
        self._pending: int | None = None

    def _handler(self, signum: int, frame: object) -> None:
        if self._deferring:
            self._pending = signum
            return
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    def __enter__(self) -> "SignalGuard":
        if self._active:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handler)
        return self

    def defer(self) -> None:
        self._deferring = True

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if exc_type is None and self._pending is not None:  # interrupted during cleanup: still honour it
            if self._pending == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + self._pending)
