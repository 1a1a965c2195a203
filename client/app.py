"""The ClientApp: reads a train/evaluate message, calls ``shared.task``, packs the reply.

The client's privacy ledger (its DP-SGD events) lives in ``context.state``, which Flower keeps per node
across rounds, so the epsilon it reports is cumulative over every round it trained in.
"""

from __future__ import annotations

from shared.tfenv import load_tensorflow  # import-time switches before TensorFlow: keep first

load_tensorflow()  # flwr imports TensorFlow itself; load it first, quietly and with the switches set

# isort: split

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from shared import privacy
from shared.setup import decode_setup
from shared.task import evaluate_client, train_client

app = ClientApp()
LEDGER_KEY = "fedae-privacy-ledger"


def _client_id(context: Context) -> int:
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ValueError("node config needs 'partition-id' (the index of this site's data)")
    return int(node_config["partition-id"])


def _load_ledger(context: Context) -> list[privacy.TrainingEvent]:
    record = context.state.get(LEDGER_KEY)
    if record is None:
        return []
    columns = ("round", "noise_multiplier", "sampling_probability", "steps", "num_examples")
    return [
        privacy.TrainingEvent(int(r), float(s), float(q), int(t), int(n))
        for r, s, q, t, n in zip(*(record[c] for c in columns), strict=True)
    ]


def _store_ledger(context: Context, ledger: list[privacy.TrainingEvent]) -> None:
    rows = [e.to_dict() for e in ledger]
    context.state[LEDGER_KEY] = ConfigRecord(
        {
            key: [row[key] for row in rows]
            for key in ("round", "noise_multiplier", "sampling_probability", "steps", "num_examples")
        }
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    config, spec, scaler = decode_setup(dict(msg.content["config"]))
    client_id = _client_id(context)
    ledger = _load_ledger(context)
    outcome = train_client(
        config,
        spec,
        scaler,
        msg.content["arrays"].to_numpy_ndarrays(),
        client_id,
        int(msg.content["config"]["server-round"]),
        ledger,
    )
    _store_ledger(context, ledger)  # recorded before the weights it paid for leave the client
    metrics = {"train-loss": outcome.train_loss, "num-examples": outcome.num_examples, "client-id": client_id}
    if outcome.event is not None and outcome.epsilon is not None:
        metrics |= {
            "epsilon": outcome.epsilon,
            "steps": outcome.event.steps,
            "sampling-probability": outcome.event.sampling_probability,
        }
    content = RecordDict({"arrays": ArrayRecord(outcome.weights), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    config, spec, scaler = decode_setup(dict(msg.content["config"]))
    client_id = _client_id(context)
    metrics = evaluate_client(config, spec, scaler, msg.content["arrays"].to_numpy_ndarrays(), client_id)
    metrics["client-id"] = client_id
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
