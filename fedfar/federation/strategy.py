"""The FedFAR Flower strategy: device registration, priming round, learner masks, masked-delta merging, the byte
ledger and (with simulated devices) availability, out-of-memory replies and the simulated clock.

The strategy owns the global model (a stock-layout state dict) and merges client deltas *into* it
(`fedfar.federation.exchange.merge_deltas`); it never replaces the global arrays with a partial aggregate, which is what
stock Flower strategies would do with replies that carry only some tensors. The same class runs the baselines:
FedAvg with full fine-tuning and full-model exchange is the plan with every tensor dense.
"""
from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from ..devices.clock import available, clock_round
from ..devices.device import profile_from_record
from ..devices.profiles import DeviceProfile
from ..methods.far import ffn_sizes, select_learners
from . import checkpoint, exchange
from .checkpoint import rng_state, set_rng_state
from .codecs import decode, encode, pack, payload_nbytes, serialized_nbytes
from .config import RunConfig
from .results import RunFolder


class FedFar(Strategy):
    POLL_S = 1.0  # how often replies are pulled (Flower's send_and_receive sleeps 3 s)

    def __init__(self, cfg: RunConfig, model: torch.nn.Module, folder: RunFolder,
                 evaluate_fn: Callable[[], dict[str, float]]) -> None:
        self.cfg, self.spec = cfg, cfg.spec
        self.model = model
        self.state = model.state_dict()  # live tensors: merging into it updates the model the server evaluates
        self.plan = self.spec.exchange_plan(model)
        self.server_opt = cfg.server_optimizer()  # moments per tensor, updated only where something was sent
        self.folder = folder
        self.evaluate_fn = evaluate_fn
        self.rng = random.Random(cfg.seed)
        self.sizes = ffn_sizes(model) if self.plan.sliced else []
        # Global mask (global mode) or the union of rows any client has trained so far (local mode).
        self.rows: list[torch.Tensor] | None = None
        if self.plan.sliced and cfg.mask_mode == "local":
            self.rows = [torch.zeros(0, dtype=torch.long) for _ in self.sizes]
        # Global mode with reprime-every: every row any mask so far has held. They all differ from the pretrained
        # weights the devices hold, so they all travel down; the mask (self.rows) says which of them learn.
        self.sent_rows: list[torch.Tensor] | None = None
        self.busy: list[tuple[float, float]] = []  # wall-clock intervals of training / evaluation anywhere
        # Simulated devices: node id -> profile (from the register round); availability has its own stream so
        # switching devices on does not change which clients the sampler would otherwise pick.
        self.profiles: dict[int, DeviceProfile] = {}
        self.partition_of: dict[int, int] = {}  # node id -> partition id, from the register round
        self.avail_rng = random.Random(cfg.seed + 1)
        self.deadline = cfg.deadline_s or None
        self.sim_time = 0.0
        self.dropped: set[int] = set()  # nodes whose reply an injected `drop` fault lost this round

    # ----------------------------------------------------------------------------------------- messages
    def _nodes(self, grid: Grid) -> list[int]:
        """All nodes in partition order. Node ids are random in every run; ordering by them would hand the
        seeded sampler and availability draws to other partitions each time."""
        return sorted(grid.get_node_ids(), key=lambda n: (self.partition_of.get(n, -1), n))

    def _sample(self, grid: Grid) -> list[int]:
        """`fraction-train` of all nodes, drawn among those available this round (all, without devices)."""
        nodes = self._nodes(grid)
        k = max(1, round(self.cfg.fraction_train * len(nodes)))
        nodes = self._available(nodes)
        chosen = set(self.rng.sample(nodes, min(k, len(nodes))))
        return [n for n in nodes if n in chosen]

    def _available(self, nodes: list[int]) -> list[int]:
        """The nodes whose device is available this round (one seeded draw each); all without devices."""
        if not self.profiles:
            return nodes
        up = available([self.profiles[n] for n in nodes], self.avail_rng)
        return [n for n, ok in zip(nodes, up) if ok]

    @staticmethod
    def _messages(nodes: list[int], content: RecordDict, message_type: str) -> list[Message]:
        return [Message(content=content, dst_node_id=n, message_type=message_type) for n in nodes]

    def _down_part(self) -> ArrayRecord:
        """The trainable part of the global model (devices hold the pretrained rest), float32: with mask refreshes,
        every row a mask has held so far."""
        return pack(encode(exchange.select(self.state, self.plan, self.sent_rows or self.rows), "float32"))

    def _down_content(self, server_round: int, config: ConfigRecord | None = None) -> RecordDict:
        """A training message: the part, its round and, once a refresh has left rows in the part that no longer
        learn, the mask itself (int32 row indices)."""
        content = {"part": self._down_part(),
                   "config": ConfigRecord({**(config or {}), "server-round": server_round})}
        if self.sent_rows is not None:
            content["learners"] = pack(encode({f"ffn.{i}.rows": r.to(torch.int32) for i, r in enumerate(self.rows)},
                                              "float32"))
        return RecordDict(content)

    def _send(self, grid: Grid, messages: list[Message], what: str = "") -> list[tuple[Message, Message | None]]:
        """Send and wait; pair each message with its reply (None if lost). One message per node.

        Replies are pulled as they come (Grid.send_and_receive does the same, silently), so the log can show how
        many of the selected clients are done and about how long the rest will take. With `round-timeout-s`,
        replies that have not come by then are lost: a hanging client cannot hold the run."""
        if not messages:
            return []
        pending = set(grid.push_messages(messages))
        total, replies, start, shown = len(pending), {}, time.perf_counter(), 0
        timeout = self.cfg.round_timeout_s or float("inf")
        while pending and time.perf_counter() - start < timeout:
            for reply in grid.pull_messages(pending):
                pending.discard(reply.metadata.reply_to_message_id)
                replies[reply.metadata.src_node_id] = reply
            if what and shown != len(replies) and pending:
                shown = len(replies)
                elapsed = time.perf_counter() - start
                log(INFO, "  %s: %d/%d clients done, %.0f s, about %.0f s left", what, shown, total, elapsed,
                    elapsed / shown * (total - shown))
            if pending:
                time.sleep(self.POLL_S)
        if pending:
            log(WARNING, "  %s: %d of %d clients did not reply within round-timeout-s = %g s: lost", what or "round",
                len(pending), total, self.cfg.round_timeout_s)
        return [(m, replies.get(m.metadata.dst_node_id)) for m in messages]

    # ----------------------------------------------------------------------------------------- devices
    def register(self, grid: Grid, record: bool = True) -> None:
        """Ask every node which partition and which device it is. Devices are simulated when nodes have one.
        `record=False` (a resumed run) keeps the registration out of the ledger, which already has it."""
        nodes = sorted(grid.get_node_ids())
        messages = self._messages(nodes, RecordDict({"config": ConfigRecord({"server-round": 0})}), "query.register")
        entries = []
        for msg_out, reply in self._send(grid, messages):
            entry = self._ledger_entry(0, "register", msg_out, reply)
            entries.append(entry)
            if entry["status"] == "ok":
                try:
                    self.partition_of[msg_out.metadata.dst_node_id] = int(reply.content["metrics"]["partition-id"])
                    if (profile := profile_from_record(reply.content["device"])) is not None:
                        self.profiles[msg_out.metadata.dst_node_id] = profile
                except (KeyError, ValueError, TypeError) as err:
                    entry.update(status="error", error=f"malformed registration: {err}"[:300])
        if record:
            self.folder.append_ledger(entries)
        bad = [e for e in entries if e["status"] != "ok"]
        if bad:
            raise RuntimeError(f"{len(bad)} of {len(entries)} nodes failed to register: {bad[0]['error']}")
        if self.profiles:
            counts: dict[str, int] = {}
            for p in self.profiles.values():
                counts[p.name] = counts.get(p.name, 0) + 1
            log(INFO, "devices: %s", ", ".join(f"{n} x{c}" for n, c in sorted(counts.items())))

    def clock(self, entries: list[dict]) -> float:
        """Advance the simulated clock by one round (fedfar.devices.clock.clock_round); stragglers become "late"."""
        duration = clock_round(entries, self.profiles, self.deadline)
        self.sim_time += duration
        return duration

    # ----------------------------------------------------------------------------------------- priming
    def choose_global_mask(self, grid: Grid, server_round: int = 0) -> list[dict]:
        """Global mask mode: clients send node scores; the server picks one mask for everyone. Round 0 primes the
        pretrained model; a refresh (`reprime-every`, before round `server_round`) primes the current global model,
        whose trainable part goes down with the request. Returns the priming's ledger entries."""
        if not self.plan.sliced or self.cfg.mask_mode != "global":
            return []
        if not self.spec.primes:  # random selection: the server draws the mask from the run's seed
            self.rows = self.spec.initial_learners(self.model, self.cfg.seed)
            return []
        content = RecordDict({"config": ConfigRecord({"server-round": server_round}),
                              **({"part": self._down_part()} if server_round else {})})
        messages = self._messages(self._priming_cohort(grid, server_round), content, "train.prime")
        scores, total, rows, answered = [torch.zeros(d, dtype=torch.float64) for d in self.sizes], 0.0, [], []
        pairs = self._send(grid, messages, "priming")
        for msg_out, reply in pairs:
            rows.append(self._ledger_entry(server_round, "prime", msg_out, reply))
        self.clock(rows)
        for (msg_out, reply), entry in zip(pairs, rows):
            if entry["status"] == "ok":
                try:
                    answered.append((entry["partition_id"], *self._check_scores(reply)))
                    self.busy.append((entry["prime_start"], entry["prime_end"]))
                except (ValueError, KeyError, TypeError) as err:
                    entry.update(status="rejected", error=f"scores: {err}"[:300])
        # Partition order, not arrival order, so the sums (and ties in the ranking) repeat run after run.
        for _, w, s in sorted(answered, key=lambda a: a[0]):
            for i in range(len(scores)):
                scores[i] += w * s[i]
            total += w
        self.folder.append_ledger(rows)
        if total == 0 and server_round:  # a refresh that nobody answered changes nothing: the run goes on
            log(WARNING, "mask refresh before round %d: no client answered with valid scores; the mask stays",
                server_round)
            return rows
        if total == 0:
            raise RuntimeError("no client answered the priming round with valid scores: cannot choose learners")
        previous = self.rows
        self.rows = select_learners([s / total for s in scores], self.spec.retention)
        if server_round:
            # The mask before this refresh is in sent_rows already (or is all of it, at the first refresh).
            self.sent_rows = [torch.cat([a, b]).unique(sorted=True) for a, b in
                              zip(self.sent_rows or previous, self.rows)]
            kept = sum(int(torch.isin(new, old).sum()) for new, old in zip(self.rows, previous))
            log(INFO, "mask refresh before round %d: %d of %d learners kept; %d rows now travel down",
                server_round, kept, sum(r.numel() for r in self.rows), sum(r.numel() for r in self.sent_rows))
        self.folder.write_mask(self.rows, self.sizes, primed=sorted(a[0] for a in answered), server_round=server_round)
        log(INFO, "priming: %d/%d clients scored FFN nodes; kept %d of %d nodes per block",
            sum(e["status"] == "ok" for e in rows), len(rows), self.rows[0].numel(), self.sizes[0])
        return rows

    def _priming_cohort(self, grid: Grid, server_round: int = 0) -> list[int]:
        """The nodes that prime: a seeded sample of `priming-clients` among the available ones (all of them in a
        smaller fleet), so round 0 does not grow with the fleet. Its own generator (one per refresh): the cohort
        does not shift which clients the training rounds sample."""
        nodes = self._available(self._nodes(grid))
        if len(nodes) <= self.cfg.priming_clients:
            return nodes
        chosen = set(random.Random(self.cfg.seed + 2 + server_round).sample(nodes, self.cfg.priming_clients))
        return [n for n in nodes if n in chosen]

    # ----------------------------------------------------------------------------------------- Strategy API
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        return self._messages(self._sample(grid), self._down_content(server_round, config), "train")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, then merge the valid ones (all at once); invalid ones are left out."""
        accepted, _ = self._accept(list(replies))
        self._merge(accepted)
        # The global model lives in self.state; returning None keeps Flower from swapping in a partial one.
        return None, MetricRecord({"clients": len(accepted)})

    # ----------------------------------------------------------------------------------------- trust nothing
    @staticmethod
    def _examples(reply: Message) -> float:
        w = float(reply.content["metrics"]["num-examples"])
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"num-examples must be positive and finite, got {w}")
        return w

    def _check_scores(self, reply: Message) -> tuple[float, list[torch.Tensor]]:
        """(examples, per-block scores) of a priming reply, or ValueError."""
        w = self._examples(reply)
        s = decode(reply.content["scores"])
        out = []
        for i, d in enumerate(self.sizes):
            t = s[f"scores.{i}"]
            if tuple(t.shape) != (d,) or not t.is_floating_point() or not torch.isfinite(t).all():
                raise ValueError(f"scores.{i} must be {d} finite floats, got {t.dtype} {tuple(t.shape)}")
            out.append(t.double())
        return w, out

    def _check_delta(self, reply: Message) -> tuple[dict[str, torch.Tensor], float]:
        """(delta, examples) of a training reply, or ValueError naming what is wrong (fedfar.federation
        .exchange.check_delta): nothing a client sends reaches the global model unchecked."""
        w = self._examples(reply)
        delta = decode(reply.content["delta"])
        global_mask = self.plan.sliced and self.cfg.mask_mode == "global"
        if global_mask and not any(k.endswith(".rows") for k in delta):
            delta.update({f"ffn.{i}.rows": r for i, r in enumerate(self.rows)})  # the mask the server sent
        exchange.check_delta(delta, self.plan, self.state, self.rows if global_mask else None,
                             self.cfg.max_update_norm)
        return delta, w

    def _accept(self, replies: list[Message]) -> tuple[list[tuple[dict, float]], dict[int, str]]:
        """Valid (delta, examples) of the replies, in partition order, and {index in replies: why rejected}."""
        accepted, rejected = [], {}
        for i, reply in enumerate(replies):
            if reply.has_error():
                continue
            try:
                pid = int(reply.content["metrics"]["partition-id"])
                accepted.append((pid, *self._check_delta(reply)))
            except Exception as err:  # noqa: BLE001 -- whatever a reply holds, it must not stop the server
                rejected[i] = f"{type(err).__name__}: {err}"[:300]
        # Partition order, not arrival order: float sums then come out the same in every run with the same seed.
        return [(d, w) for _, d, w in sorted(accepted, key=lambda a: a[0])], rejected

    def _merge(self, accepted: list[tuple[dict, float]]) -> float:
        """Merge validated deltas into the global model; returns the L2 norm of the change it made."""
        if not accepted:
            return 0.0
        full_rows = [torch.arange(d) for d in self.sizes] if self.plan.sliced else None
        before = exchange.select(self.state, self.plan, full_rows)
        exchange.merge_deltas(self.state, accepted, self.plan, aggregator=self.cfg.aggregator,
                              trim=self.cfg.trim_share, optimizer=self.server_opt)
        after = exchange.select(self.state, self.plan, full_rows)
        if self.plan.sliced and self.cfg.mask_mode == "local":
            for i in range(len(self.rows)):
                sent = [d[f"ffn.{i}.rows"].long() for d, _ in accepted]
                self.rows[i] = torch.cat([self.rows[i], *sent]).unique(sorted=True)
        return float(sum((after[k].double() - before[k].double()).pow(2).sum() for k in after
                         if not k.endswith(".rows")) ** 0.5)

    def _drop_injected(self, rnd: int, pairs: list[tuple[Message, Message | None]]
                       ) -> list[tuple[Message, Message | None]]:
        """A `drop` fault (fedfar.federation.faults) loses the reply on its way: the server never sees it."""
        out = []
        for msg, reply in pairs:
            fault = self.cfg.fault(self.partition_of.get(msg.metadata.dst_node_id, -1), rnd)
            if fault and fault.kind == "drop":
                self.dropped.add(msg.metadata.dst_node_id)
                reply = None
            out.append((msg, reply))
        return out

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.cfg.federated_eval:
            return []
        content = RecordDict({"part": self._down_part(),
                              "config": ConfigRecord({"server-round": server_round})})
        return self._messages(self._nodes(grid), content, "evaluate")

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        good = []
        for r in replies:  # federated evaluation never touches the model; still, a malformed reply is skipped
            try:
                m = dict(r.content["metrics"]) if not r.has_error() else {}
                if m and self._examples(r) and all(math.isfinite(float(v)) for v in m.values()):
                    good.append(m)
            except (KeyError, ValueError, TypeError):
                continue
        if not good:
            return None
        total = sum(m["num-examples"] for m in good)
        # The metrics every reply has (a reply that adds keys, such as a cold start, cannot make the mean fail).
        keys = [k for k in good[0] if all(k in m for m in good[1:]) and k not in
                ("num-examples", "partition-id", "eval-start", "eval-end") and not k.endswith("-s")]
        for m in good:
            self.busy.append((m["eval-start"], m["eval-end"]))
        return MetricRecord({k: sum(m[k] * m["num-examples"] for m in good) / total for k in keys})

    def summary(self) -> None:
        log(INFO, "FedFar: method %s, mask mode %s, uplink codec %s, %d dense tensors, %d sliced FFN blocks",
            self.spec.label, self.cfg.mask_mode, self.cfg.codec, len(self.plan.dense), len(self.plan.ffn))

    # ----------------------------------------------------------------------------------------- the loop
    def _ledger_entry(self, server_round: int, phase: str, out: Message, reply: Message | None) -> dict:
        entry = {"round": server_round, "phase": phase, "node_id": out.metadata.dst_node_id,
                 "bytes_down": serialized_nbytes(out), "payload_down": _payload(out.content),
                 "bytes_up": 0, "payload_up": 0, "status": "lost", "error": ""}
        if (partition := self.partition_of.get(out.metadata.dst_node_id)) is not None:
            entry["partition_id"] = partition  # known from registration, so lost and failed replies name it too
            if phase == "train" and (fault := self.cfg.fault(partition, server_round)) is not None:
                entry["fault"] = fault.label  # the injected fault, whatever became of the reply
        if reply is None:
            return entry
        entry["bytes_up"] = serialized_nbytes(reply)
        if reply.has_error():  # an error reply has no content: record it, never let it stop the round
            entry.update(status="error", error=error_reason(str(reply.error.reason)))
            return entry
        entry["payload_up"] = _payload(reply.content)
        metrics = dict(reply.content["metrics"]) if "metrics" in reply.content else {}
        device = dict(reply.content["device"]) if "device" in reply.content else {}
        entry["status"] = "oom" if str(device.get("status", "ok")).startswith("oom") else "ok"
        if phase == "register":
            device = {"device": device["name"]} if "name" in device else {}
        for k, v in {**metrics, **device}.items():
            if k != "status":
                entry[k.replace("-", "_")] = v
        if entry["status"] == "oom":
            entry["error"] = str(device["status"])
        return entry

    # ----------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, rnd: int, history: list[dict], mb_up: float, mb_down: float, wall_s: float) -> None:
        """Everything the server needs to continue after round `rnd` (fedfar.federation.checkpoint)."""
        checkpoint.save(self.folder.path, rnd, self.state, self.server_opt.state_dict(), {
            "num_nodes": len(self.partition_of), "rows": [r.tolist() for r in self.rows] if self.rows else None,
            "sent_rows": [r.tolist() for r in self.sent_rows] if self.sent_rows else None,
            "rng": rng_state(self.rng), "avail_rng": rng_state(self.avail_rng), "sim_time": self.sim_time,
            "mb_up": mb_up, "mb_down": mb_down, "history": history, "busy": self.busy, "wall_s": wall_s})

    def restore(self, ckpt: checkpoint.Checkpoint) -> tuple[list[dict], float, float, float]:
        """Put the server back where checkpoint `ckpt` left it; drop rows of rounds after it from the run folder.
        Returns (history, MB up, MB down, wall seconds so far)."""
        meta = ckpt.meta
        if len(self.partition_of) != meta["num_nodes"]:
            raise RuntimeError(f"the run was checkpointed with {meta['num_nodes']} nodes and resumes with "
                               f"{len(self.partition_of)}: resume with --supernodes {meta['num_nodes']}")
        with torch.no_grad():
            for name, value in ckpt.state.items():
                self.state[name].copy_(value)
        self.server_opt.load_state_dict(ckpt.optimizer)
        self.rows = [torch.tensor(r, dtype=torch.long) for r in meta["rows"]] if meta["rows"] else self.rows
        if meta.get("sent_rows"):
            self.sent_rows = [torch.tensor(r, dtype=torch.long) for r in meta["sent_rows"]]
        set_rng_state(self.rng, meta["rng"])
        set_rng_state(self.avail_rng, meta["avail_rng"])
        self.sim_time, self.busy = meta["sim_time"], [tuple(b) for b in meta["busy"]]
        self.folder.keep_rounds(ckpt.round)
        log(INFO, "resumed after round %d of %d", ckpt.round, self.cfg.num_rounds)
        return meta["history"], meta["mb_up"], meta["mb_down"], meta["wall_s"]

    def run(self, grid: Grid, resume: checkpoint.Checkpoint | None = None) -> dict:
        """Register, priming (if any), then `num_rounds` of train / aggregate / evaluate, with the ledger and a
        checkpoint after every round. `resume`: continue after the checkpoint's round instead."""
        self.summary()
        t_run = time.perf_counter()
        self.register(grid, record=resume is None)
        if resume is None:
            primed = self.choose_global_mask(grid)
            history, wall_before = [], 0.0
            t_eval = time.time()
            base = self.evaluate_fn()
            self.busy.append((t_eval, time.time()))
            # Every byte counts: the priming's scores (and its requests) are in the totals from round 0 on.
            mb_up = sum(e["bytes_up"] for e in primed) / 1e6
            mb_down = sum(e["bytes_down"] for e in primed) / 1e6
            history.append({"round": 0, **base, "mb_up": mb_up, "mb_down": mb_down,
                            "wall_s": time.perf_counter() - t_run,
                            **({"sim_time_s": self.sim_time} if self.profiles else {})})
            self.folder.append_round(history[-1])
            self.save_checkpoint(0, history, mb_up, mb_down, history[-1]["wall_s"])
        else:
            history, mb_up, mb_down, wall_before = self.restore(resume)
        first = len(history)
        t_rounds = time.perf_counter()
        for rnd in range(first, self.cfg.num_rounds + 1):
            k = self.cfg.reprime_every
            primed = self.choose_global_mask(grid, rnd) if k and rnd > 1 and (rnd - 1) % k == 0 else []
            messages = list(self.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
            t_send = time.perf_counter()
            self.dropped.clear()
            pairs = self._drop_injected(rnd, self._send(grid, messages, f"round {rnd}/{self.cfg.num_rounds}"))
            wait = time.perf_counter() - t_send
            entries = [self._ledger_entry(rnd, "train", m, r) for m, r in pairs]
            for e in entries:
                if e["status"] == "lost":
                    e["error"] = ("reply dropped on its way (injected fault)" if e["node_id"] in self.dropped
                                  else "no reply" + (f" within round-timeout-s = {self.cfg.round_timeout_s:g} s"
                                                     if self.cfg.round_timeout_s else ""))
            sim_round = self.clock(entries) if self.profiles else None
            for e in entries:
                if "train_start" in e:
                    self.busy.append((e["train_start"], e["train_end"]))
                if e["status"] != "ok":
                    log(WARNING, "round %d: node %s (%s) %s %s", rnd, e["node_id"], e.get("device", "-"),
                        e["status"], e["error"] or f"{e.get('sim_total_s', 0):.0f} s > deadline {self.deadline} s")
            # Only updates that arrived in (simulated) time and pass every check are merged.
            arrived = [(e, r) for (_, r), e in zip(pairs, entries) if r is not None and e["status"] == "ok"]
            accepted, rejected = self._accept([r for _, r in arrived])
            for i, reason in rejected.items():
                arrived[i][0].update(status="rejected", error=reason)
                log(WARNING, "round %d: node %s update rejected: %s", rnd, arrived[i][0]["node_id"], reason)
            update_norm = self._merge(accepted)
            eval_pairs = self._send(grid, list(self.configure_evaluate(rnd, ArrayRecord(), ConfigRecord(), grid)))
            fed_eval = self.aggregate_evaluate(rnd, [r for _, r in eval_pairs if r is not None])
            eval_entries = [self._ledger_entry(rnd, "evaluate", m, r) for m, r in eval_pairs]
            t_eval = time.time()
            metrics = self.evaluate_fn()
            self.busy.append((t_eval, time.time()))
            up = sum(e["bytes_up"] for e in entries + primed) / 1e6
            down = sum(e["bytes_down"] for e in entries + primed) / 1e6
            mb_up, mb_down = mb_up + up, mb_down + down
            ok = sum(e["status"] == "ok" for e in entries)
            row = {"round": rnd, **metrics, "clients": len(entries), "clients_ok": ok, "mb_up": mb_up,
                   "mb_down": mb_down, "round_wait_s": wait, "wall_s": wall_before + time.perf_counter() - t_run,
                   "update_norm": update_norm, "clients_rejected": len(rejected),
                   "clients_lost": sum(e["status"] in ("lost", "error") for e in entries)}
            if sim_round is not None:
                row.update(sim_round_s=sim_round, sim_time_s=self.sim_time,
                           clients_oom=sum(e["status"] == "oom" for e in entries),
                           clients_late=sum(e["status"] == "late" for e in entries))
            if eval_entries:  # federated evaluation's traffic, beside (not in) the training's
                row.update(eval_mb_up=sum(e["bytes_up"] for e in eval_entries) / 1e6,
                           eval_mb_down=sum(e["bytes_down"] for e in eval_entries) / 1e6)
            if fed_eval:
                row.update({f"fed_{k}": v for k, v in fed_eval.items()})
            history.append(row)
            self.folder.append_ledger(entries + eval_entries)  # the refresh's priming rows are in already
            self.folder.append_round(row)
            self.save_checkpoint(rnd, history, mb_up, mb_down, row["wall_s"])
            sim = (f" | simulated round {sim_round:.0f} s, total {self.sim_time / 60:.1f} min"
                   if sim_round is not None else "")
            left = (time.perf_counter() - t_rounds) / (rnd - first + 1) * (self.cfg.num_rounds - rnd)
            log(INFO, "[round %d/%d] %d/%d clients ok | %s | up %.2f MB, down %.2f MB (cumulative %.2f / %.2f) | "
                "%.0f s%s | about %.1f min left", rnd, self.cfg.num_rounds, ok, len(entries),
                ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()), up, down, mb_up, mb_down, wait, sim, left / 60)
        return {"history": history, "wall_s": wall_before + time.perf_counter() - t_run,
                "busy_s": union_seconds(self.busy), "devices": bool(self.profiles), "wall_before_s": wall_before}


def error_reason(text: str, limit: int = 300) -> str:
    """The line of a client's error that says what went wrong: Ray wraps a ClientApp's exception in a traceback
    with terminal colours, whose first 300 characters name only the actor."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not set(line) <= set("^~ ")]
    said = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    line = (said or lines or [""])[-1]
    if m := re.search(r"ClientAppException occurred\. Message: (.*?)'?>?$", line):
        line = f"ClientApp raised: {m.group(1)}"
    return line[:limit]


def _payload(content: RecordDict) -> int:
    return sum(payload_nbytes(r) for r in content.values() if isinstance(r, ArrayRecord))


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals: time during which something was training or evaluating."""
    total, cur_start, cur_end = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        total += cur_end - cur_start
    return total
