"""The client's side of SecAgg+: Flower's ``secaggplus_mod`` for the messages that ask for it, and the
legacy FitIns/FitRes (EvaluateIns/EvaluateRes) content that Flower's SecAgg+ workflow exchanges.

The server's SecAgg+ path (``server/secure.py``) runs Flower's legacy ``DefaultWorkflow``: its train and
evaluate messages carry legacy content, and each SecAgg+ train message a ``secaggplus_configs`` record.
``secaggplus_mod`` answers the protocol's key-exchange and unmask stages itself and calls the train
handler once per round, in the stage that collects masked vectors: it masks the handler's weights and
sends them with the handler's metrics, which travel in the clear. The plain path's messages pass through
untouched.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, EvaluateRes, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from shared.config import FedaeConfig

logger = logging.getLogger("fedae.client")


class _HandlerRefused(Exception):
    """The train handler replied with an error (e.g. budget exhausted): pass it on, unmasked and untouched."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def secaggplus_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for messages that carry the SecAgg+ config record, else pass through.

    ``secaggplus_mod`` reads the handler's reply as content; a refusal is an error reply with no content,
    so it is returned as it is: to the server that client dropped out of the round, and SecAgg+ removes
    its masks from the others' sum with the shares its neighbours hold.
    """
    if RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)

    def handler(inner: Message, inner_context: Context) -> Message:
        reply = call_next(inner, inner_context)
        if reply.has_error():
            raise _HandlerRefused(reply)
        return reply

    try:
        return secaggplus_mod(msg, context, handler)
    except _HandlerRefused as refused:
        return refused.reply


def is_legacy(msg: Message) -> bool:
    """Whether ``msg`` came from the SecAgg+ path (legacy FitIns / EvaluateIns content)."""
    return any(key in msg.content.array_records for key in ("fitins.parameters", "evaluateins.parameters"))


def read_instructions(msg: Message) -> tuple[list[np.ndarray], dict[str, Any]]:
    """The global weights and the config values of a train or evaluate message, from either path."""
    if not is_legacy(msg):
        return msg.content["arrays"].to_numpy_ndarrays(), dict(msg.content["config"])
    prefix = "fitins" if "fitins.parameters" in msg.content.array_records else "evaluateins"
    # Read the records directly: compat.recorddict_to_fitins refuses list values, and the run setup holds
    # lists (input shape, scaler).
    parameters = compat.arrayrecord_to_parameters(msg.content.array_records[f"{prefix}.parameters"], True)
    return parameters_to_ndarrays(parameters), dict(msg.content.config_records[f"{prefix}.config"])


def fit_reply(weights: list[np.ndarray], num_examples: int, metrics: dict[str, float | int]) -> RecordDict:
    """Legacy FitRes content: ``secaggplus_mod`` masks the weights and keeps the metrics beside them."""
    fit_res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(weights), num_examples, dict(metrics))
    return compat.fitres_to_recorddict(fit_res, keep_input=False)


def evaluate_reply(metrics: dict[str, float]) -> RecordDict:
    """Legacy EvaluateRes content; the loss is the held-out reconstruction loss."""
    result = EvaluateRes(Status(Code.OK, ""), metrics["eval-loss"], int(metrics["num-examples"]), metrics)
    return compat.evaluateres_to_recorddict(result)


def clipped_count(weights: list[np.ndarray], num_examples: int, config: FedaeConfig) -> int:
    """How many weights SecAgg+'s quantisation will clip for this client.

    ``secaggplus_mod`` multiplies the weights by ``num_examples / max-weight`` (FedAvg's weighting, done
    before masking) and clips the products to [-clipping-range, clipping-range]. Clipping a DP-SGD output
    is post-processing, so the guarantee holds, but the average moves: the count lets the server say so.
    """
    scale = num_examples / config.secagg_max_weight
    count = int(sum(np.count_nonzero(np.abs(w * scale) > config.secagg_clipping_range) for w in weights))
    if count:
        logger.warning(
            "%d of %d weights exceed the SecAgg+ range %g after weighting by n/max-weight = %.3g and will "
            "be clipped; raise secagg-clipping-range (or secagg-max-weight if n exceeds it)",
            count,
            sum(w.size for w in weights),
            config.secagg_clipping_range,
            scale,
        )
    return count
