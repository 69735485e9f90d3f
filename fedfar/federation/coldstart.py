"""Cold starts: how long a ClientApp process takes from its start to its first step.

In a Flower 1.41 deployment every message a SuperNode receives runs in a fresh `flwr-clientapp` process, so each
message pays Python's start, Flower's own set-up (pulling the message, installing the FAB), importing this app,
opening the job (partition, model, device plan) and only then trains. The first message a process serves reports
where that time went; later ones (a simulation's long-lived Ray workers) report nothing, they start warm.
A node's warm worker (fedfar.federation.node_worker) serves each message on behalf of a fresh ClientApp process:
it `adopt`s that process's start and marks, so the figures still run from the ClientApp process's start.

Times are wall-clock (`time.time()`), because the process start is the kernel's wall-clock record of it.
Deliberately light: imported first by the ClientApp module, before anything heavy, to time the imports.
"""
from __future__ import annotations

import time

import psutil

PROCESS_START = psutil.Process().create_time()
_marks: dict[str, float] = {}
_served = 0


def mark(name: str) -> None:
    """Record the first time this process reaches `name` ("import-start", "import-end", "step")."""
    _marks.setdefault(name, time.time())


def message_started() -> bool:
    """Count a message; True if it is the first this process serves (the one that pays the cold start)."""
    global _served
    _served += 1
    return _served == 1


def snapshot() -> dict:
    """This process's start and marks, for the worker that serves its message."""
    return {"process-start": PROCESS_START, "marks": dict(_marks)}


def adopt(snap: dict) -> None:
    """Count from another process's start and marks (a ClientApp process whose message this worker serves)."""
    global PROCESS_START, _served
    PROCESS_START, _served = float(snap["process-start"]), 0
    _marks.clear()
    _marks.update({str(k): float(v) for k, v in snap["marks"].items()})


def figures() -> dict[str, float]:
    """This process's cold start in seconds, split into Flower's start-up (process start to this app's import:
    the interpreter, flwr, pulling the message, the FAB), this app's imports, and the rest up to the first
    training or evaluation step (opening the job). Empty if no step has run yet."""
    if "step" not in _marks:
        return {}
    begin, end = _marks.get("import-start", PROCESS_START), _marks.get("import-end", PROCESS_START)
    return {"boot-s": begin - PROCESS_START, "import-s": end - begin, "to-step-s": _marks["step"] - end,
            "cold-start-s": _marks["step"] - PROCESS_START}
