"""The ClientApp: reads a train/evaluate message, calls ``shared.task``, packs the reply.

The client's privacy ledger is an SQLite file on the client's side (``shared.ledger``), at
``<state-dir>/client-<partition-id>/``; a site's node config may set its own ``state-dir``.

Node config a deployed site's SuperNode passes (``fedae supernode`` sets them): ``partition-id`` (the
site's client id, unique in the federation), ``site`` (its name, for messages), ``data-file`` (its own
CSV/Parquet/NPZ file; without it the client takes its part of the run's scenario, as in simulation),
``state-dir`` and ``target-epsilon``. Bad data is answered with an error reply that names the site and
the problem (``DATA_ERROR``); it never stops the SuperNode. Every
training is charged there before it runs (so before any weights leave), and the epsilon it reports
composes every event in its ledger (all rounds, all runs).

The same handlers serve both aggregation paths: plain messages, and the SecAgg+ path's legacy content
(``client/secure.py``), where Flower's ``secaggplus_mod`` masks the weights this handler returns.

With threshold-rule "federated-percentile" the server sends one query ("query.threshold") after the
rounds; the handler charges the histogram release to the ledger before it replies with the noisy counts
(``shared.task.threshold_histogram``). A query whose content cannot be used gets an error reply
(``BAD_QUERY``), as does a refusal (budget) or a data error; none stops the SuperNode.
"""

from __future__ import annotations

from shared.tfenv import load_tensorflow  # import-time switches before TensorFlow: keep first

load_tensorflow()  # flwr imports TensorFlow itself; load it first, quietly and with the switches set

# isort: split

import logging
import math
import time

from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable

from client.secure import (
    clipped_count,
    evaluate_reply,
    fit_reply,
    is_legacy,
    read_instructions,
    secaggplus_when_asked,
)
from shared.config import ConfigError, FedaeConfig
from shared.data.errors import DataError
from shared.data.sources import DataSpec
from shared.ledger import LedgerError, PrivacyLedger, ledger_path
from shared.logs import log_to_stderr
from shared.privacy import CANNOT_ACCOUNT, PrivacyRefusal
from shared.setup import (
    BAD_QUERY,
    DATA_ERROR,
    RUN_KEY,
    SECAGG_CLIPPED,
    THRESHOLD_QUERY,
    UNIT_WEIGHT,
    decode_scorer,
    decode_setup,
)
from shared.task import SiteData, evaluate_client, threshold_histogram, train_client

app = ClientApp()
logger = logging.getLogger("fedae.client")


def _client_id(context: Context) -> int:
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ValueError("node config needs 'partition-id' (the index of this site's data)")
    return int(node_config["partition-id"])


def _site(context: Context, spec: DataSpec) -> SiteData | None:
    """The site's own data file from node config, checked against the run's ``spec`` when read."""
    path = str(context.node_config.get("data-file", "") or "")
    return SiteData(path, spec) if path else None


def _site_name(context: Context) -> str:
    name = context.node_config.get("site", "")
    return f"site {name!r} (client-id={_client_id(context)})" if name else f"client-id={_client_id(context)}"


def _data_error(msg: Message, context: Context, err: Exception) -> Message:
    """An error reply naming the site and why its data cannot be used; nothing was trained or charged
    (data is read before the ledger is touched)."""
    reason = f"{_site_name(context)}: {err}"
    log_to_stderr()
    logger.error("%s", reason)
    return Message(error=Error(code=DATA_ERROR, reason=reason), reply_to=msg)


def _state_dir(config_state_dir: str, context: Context) -> str:
    """A site's own ``state-dir`` (node config) wins over the run's; there must be one."""
    state_dir = str(context.node_config.get("state-dir", "") or config_state_dir)
    if not state_dir:
        # Never fall back to a relative path: a ledger written wherever the process happens to run
        # would be lost track of, and the next run would start from zero.
        raise ValueError("no state-dir for the privacy ledger: set state-dir in the run or node config")
    return state_dir


def _site_budget(config: FedaeConfig, context: Context) -> float:
    """The site's own target-epsilon (node config) or the run's; a bad value refuses the round."""
    raw = context.node_config.get("target-epsilon", config.target_epsilon)
    try:
        budget = float(raw)
    except (TypeError, ValueError):
        budget = float("nan")
    if not (math.isfinite(budget) and budget >= 0) or (config.auto_noise and budget == 0):
        raise PrivacyRefusal(
            f"client-id={_client_id(context)}: node config target-epsilon must be a number >= 0"
            f"{' and > 0 with noise-multiplier auto' if config.auto_noise else ''}, got {raw!r}"
        )
    return budget


def client_dp_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's client-side clipping mod for the run's ``client-dp`` mode, and nothing otherwise.

    Client-side clipping is chosen per run (run config), not per deployment, so the mod is picked from
    the message: Flower's DP wrapper sends its clipping norm with each train message.
    """
    config = msg.content.config_records.get("config")
    mode = str(config.get("client-dp", "none")) if config is not None else "none"
    if mode == "client-fixed":
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


@app.train(mods=[secaggplus_when_asked, client_dp_mod])
def train(msg: Message, context: Context) -> Message:
    started = time.perf_counter()
    weights, setup_values = read_instructions(msg)
    config, spec, scaler = decode_setup(setup_values)
    client_id = _client_id(context)
    try:
        budget = _site_budget(config, context)
        with PrivacyLedger(ledger_path(_state_dir(config.state_dir, context), client_id)) as ledger:
            outcome = train_client(
                config,
                spec,
                scaler,
                weights,
                client_id,
                int(setup_values["server-round"]),
                ledger,
                # The run's key survives a server restart (Flower's run id does not): the ledger's events
                # and the kept update of a round asked for again are under it.
                str(setup_values.get(RUN_KEY) or context.run_id),
                target_epsilon=budget,
                site=_site(context, spec),
            )
    except PrivacyRefusal as refusal:
        return Message(error=Error(code=refusal.code, reason=str(refusal)), reply_to=msg)
    except (DataError, ConfigError) as err:
        return _data_error(msg, context, err)
    metrics = {
        "train-loss": outcome.train_loss,
        "num-examples": outcome.num_examples,
        "client-id": client_id,
        UNIT_WEIGHT: 1.0,  # the weight client-level DP aggregates by: every client counts the same
        # Where a round's time goes (summary.json's timing_s): the fit alone, and this whole handler.
        "fit-seconds": outcome.fit_seconds,
    }
    if outcome.event is not None and outcome.epsilon is not None:
        metrics |= {
            "epsilon": outcome.epsilon,
            "steps": outcome.event.steps,
            "sampling-probability": outcome.event.sampling_probability,
            "noise-multiplier": outcome.event.noise_multiplier,
        }
    metrics["handler-seconds"] = time.perf_counter() - started
    if is_legacy(msg):
        # SecAgg+: the mod masks these weights before they leave; the event is already in the ledger.
        metrics[SECAGG_CLIPPED] = clipped_count(outcome.weights, outcome.num_examples, config)
        return Message(content=fit_reply(outcome.weights, outcome.num_examples, metrics), reply_to=msg)
    content = RecordDict({"arrays": ArrayRecord(outcome.weights), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    weights, setup_values = read_instructions(msg)
    config, spec, scaler = decode_setup(setup_values)
    client_id = _client_id(context)
    try:
        metrics = evaluate_client(config, spec, scaler, weights, client_id, _site(context, spec))
    except (DataError, ConfigError) as err:
        return _data_error(msg, context, err)
    metrics |= {"client-id": client_id, UNIT_WEIGHT: 1.0}
    if is_legacy(msg):
        return Message(content=evaluate_reply(metrics), reply_to=msg)
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.query(THRESHOLD_QUERY)
def threshold(msg: Message, context: Context) -> Message:
    """The federated threshold's release: this site's noisy score histogram, charged before it leaves."""
    try:
        weights = msg.content["arrays"].to_numpy_ndarrays()
        setup_values = dict(msg.content["config"])
        config, spec, scaler = decode_setup(setup_values)
        scorer = decode_scorer(setup_values)
        if config.threshold_rule != "federated-percentile":
            raise ValueError(
                f"the run's threshold-rule is {config.threshold_rule!r}, not 'federated-percentile'"
            )
        client_id = _client_id(context)
    except (KeyError, TypeError, ValueError) as err:
        return _refuse(msg, BAD_QUERY, f"threshold query refused, its content cannot be used: {err!r}")
    try:
        budget = _site_budget(config, context)
        with PrivacyLedger(ledger_path(_state_dir(config.state_dir, context), client_id)) as ledger:
            outcome = threshold_histogram(
                config,
                spec,
                scaler,
                weights,
                scorer,
                client_id,
                ledger,
                str(setup_values.get(RUN_KEY) or context.run_id),
                target_epsilon=budget,
                site=_site(context, spec),
            )
    except PrivacyRefusal as refusal:
        return _refuse(msg, refusal.code, str(refusal))
    except (DataError, ConfigError) as err:
        return _data_error(msg, context, err)
    except LedgerError as err:  # no readable ledger: nothing can be charged, so nothing is released
        return _refuse(msg, CANNOT_ACCOUNT, f"{_site_name(context)}: {err}")
    except ValueError as err:  # the model does not fit this run's (checked before any charge)
        return _refuse(msg, BAD_QUERY, f"{_site_name(context)}: threshold query refused: {err}")
    metrics = {
        "client-id": client_id,
        "num-examples": outcome.num_examples,
        "release-epsilon": outcome.release_epsilon,
        "epsilon": outcome.epsilon,
    }
    content = RecordDict({"histogram": ArrayRecord([outcome.counts]), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


def _refuse(msg: Message, code: int, reason: str) -> Message:
    log_to_stderr()
    logger.warning("%s", reason)
    return Message(error=Error(code=code, reason=reason), reply_to=msg)
