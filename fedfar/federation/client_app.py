"""Flower ClientApp: one simulated edge device. Thin: each handler opens the node's job (fedfar.federation.client)
and replies with what it returns."""
from __future__ import annotations

from . import coldstart

coldstart.mark("import-start")  # a deployment's ClientApp process imports this module once per message

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from ..models import quiet_libraries
from .client import Job, register_reply

app = ClientApp()
coldstart.mark("import-end")
quiet_libraries()  # per-map and per-file bars from every worker bury the round log


def _job(msg: Message, context: Context) -> Job:
    server_round = int(msg.content["config"]["server-round"]) if "config" in msg.content else 0
    return Job.open(context.run_config, context.node_config, server_round)


@app.query("register")
def register(msg: Message, context: Context) -> Message:
    """Start of a run: which partition and which simulated device this node is."""
    return Message(register_reply(context.run_config, context.node_config), reply_to=msg)


@app.train("prime")
def prime(msg: Message, context: Context) -> Message:
    """Global mask mode, round 0: prime on local data and send node scores (no weights)."""
    return Message(_job(msg, context).prime(), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fine-tune on the received trainable part; reply with the delta of the trainable tensors only."""
    return Message(_job(msg, context).train(msg.content["part"], context.state), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation: the global model on this device's held-out share."""
    return Message(_job(msg, context).evaluate(msg.content["part"]), reply_to=msg)
