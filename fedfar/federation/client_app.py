"""Flower ClientApp: one simulated edge device. Thin: each handler hands the message's content to the node's job
(fedfar.federation.client), in this process or in the node's warm worker (node config `worker`,
fedfar.federation.node_worker), and replies with what it returns."""
from __future__ import annotations

from . import coldstart

coldstart.mark("import-start")  # a deployment's ClientApp process imports this module once per message

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from .node_worker import handle  # light: torch and transformers are imported only where the work runs

app = ClientApp()
coldstart.mark("import-end")


def _reply(kind: str, msg: Message, context: Context) -> Message:
    return Message(handle(kind, msg.content, context), reply_to=msg)


@app.query("register")
def register(msg: Message, context: Context) -> Message:
    """Start of a run: which partition and which simulated device this node is."""
    return _reply("register", msg, context)


@app.train("prime")
def prime(msg: Message, context: Context) -> Message:
    """Global mask mode, round 0: prime on local data and send node scores (no weights)."""
    return _reply("prime", msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fine-tune on the received trainable part; reply with the delta of the trainable tensors only."""
    return _reply("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Federated evaluation: the global model on this device's held-out share."""
    return _reply("evaluate", msg, context)
