"""The federated threshold's Flower side: one query to every node after the rounds, the noisy histograms
back, the percentile from ``shared.federated_threshold``.

Each node gets the final model, the run's setup and the scorer (``query.threshold``); its client charges
its ledger and replies with noisy counts, or refuses (budget spent) or fails (data error, bad content,
node gone): those are named in the release's section, and the percentile is fitted from the rest.

Plain messages on both aggregation paths. SecAgg+ hides each model because a model alone is released
without noise of its own beyond DP-SGD's; a histogram is already a Gaussian mechanism on its own, so the
server seeing each one is what its epsilon is about, and summing them under masks would buy nothing the
accounting relies on.

The release is kept in ``RUN_DIR/threshold-release.json`` under a digest of the model, scorer and run
key: exporting a finished run again reuses it instead of asking (and charging) every client again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from server.strategy import client_ids
from shared import federated_threshold
from shared.checkpoint import atomic_write
from shared.federated_threshold import ClientHistogram, ThresholdRelease
from shared.pipeline import RunSetup
from shared.privacy import REFUSAL_CODES
from shared.replies import weights_digest
from shared.scoring import ResidualScorer
from shared.setup import THRESHOLD_QUERY, encode_scorer, encode_setup

logger = logging.getLogger("fedae.server")

RELEASE_FILE = "threshold-release.json"
# As long as a round's replies may take (Strategy.start's default): a node that has not answered by then
# counts as failed, and the threshold is fitted from the others.
QUERY_TIMEOUT_S = 3600.0


def federated_threshold_release(
    grid: Grid,
    setup: RunSetup,
    weights: list[np.ndarray],
    scorer: ResidualScorer,
    run_key: str,
    timeout: float = QUERY_TIMEOUT_S,
) -> ThresholdRelease:
    """Ask every node for its noisy histogram of the model ``weights``' scores and fit the percentile.

    ``run_key`` is what the clients file the release under (empty: Flower's run id, as the SecAgg+ path's
    training events are)."""
    config = setup.config
    key = _release_key(weights, scorer, run_key)
    path = setup.out_dir / RELEASE_FILE
    kept = _kept_release(path, key)
    if kept is not None:
        logger.info("federated threshold: reusing the release kept in %s (no client asked again)", path)
        return kept
    values = {**encode_setup(config, setup.spec, setup.scaler, run_key), **encode_scorer(scorer)}
    content = RecordDict({"arrays": ArrayRecord(weights), "config": ConfigRecord(values)})
    nodes = sorted(grid.get_node_ids())
    messages = [
        Message(content, node, f"{MessageType.QUERY}.{THRESHOLD_QUERY}", group_id="threshold")
        for node in nodes
    ]
    logger.info("federated threshold: asking %d client(s) for their noisy score histograms", len(nodes))
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    histograms, refused, failed = _read_replies(messages, replies, config.threshold_bins)
    release = federated_threshold.combine(config, histograms, refused, failed, len(nodes))
    _keep_release(path, key, release)
    if release.threshold is None:
        logger.warning("federated threshold: %s", release.section["fallback"])
    else:
        logger.info("federated threshold %.6g: %s", release.threshold, release.sentence())
    return release


def _read_replies(
    sent: list[Message], replies: Iterable[Message], bins: int
) -> tuple[list[ClientHistogram], dict[str, str], list[dict]]:
    """The usable histograms, the refusals (client -> reason) and the failures ({node, client, code,
    reason}); a node that did not reply is a failure too."""
    node_of = {m.metadata.message_id: int(m.metadata.dst_node_id) for m in sent}
    histograms: dict[int, ClientHistogram] = {}
    refused: dict[str, str] = {}
    failed: list[dict] = []
    answered: set[int] = set()
    for reply in replies:
        node = node_of.get(reply.metadata.reply_to_message_id, int(reply.metadata.src_node_id))
        answered.add(node)
        if reply.has_error():
            reason, code = reply.error.reason, int(reply.error.code)
            if code in REFUSAL_CODES:
                named = client_ids([reason])
                refused[str(named[0]) if named else f"node {node}"] = reason
            else:
                failed.append({"node": node, "client": None, "code": code, "reason": reason})
            logger.warning(
                "federated threshold: node %d sent no histogram (error %d): %s", node, code, reason
            )
            continue
        try:
            histogram = _histogram(reply, bins)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            failed.append({"node": node, "client": None, "code": 0, "reason": f"malformed reply: {err!r}"})
            logger.warning("federated threshold: node %d's reply is malformed (%r); left out", node, err)
            continue
        if histogram.client in histograms:
            reason = f"client-id {histogram.client} already replied; a second histogram is left out"
            failed.append({"node": node, "client": histogram.client, "code": 0, "reason": reason})
            continue
        histograms[histogram.client] = histogram
    for node in sorted(set(node_of.values()) - answered):
        failed.append(
            {"node": node, "client": None, "code": 0, "reason": "no reply before the query timed out"}
        )
    return list(histograms.values()), refused, failed


def _histogram(reply: Message, bins: int) -> ClientHistogram:
    metrics = reply.content["metrics"]
    (counts,) = reply.content["histogram"].to_numpy_ndarrays()
    return ClientHistogram(
        client=int(metrics["client-id"]),
        counts=federated_threshold.check_histogram(counts, bins),
        num_examples=int(metrics["num-examples"]),
        release_epsilon=float(metrics["release-epsilon"]),
        epsilon=float(metrics["epsilon"]),
    )


def _release_key(weights: list[np.ndarray], scorer: ResidualScorer, run_key: str) -> str:
    scorer_json = json.dumps(scorer.to_dict(), sort_keys=True)
    return hashlib.sha256(f"{weights_digest(weights)}|{scorer_json}|{run_key}".encode()).hexdigest()


def _kept_release(path: Path, key: str) -> ThresholdRelease | None:
    """The release kept for this model, scorer and run key, or None (absent, other, unreadable)."""
    try:
        kept = json.loads(path.read_text())
        if kept.get("key") != key:
            return None
        return ThresholdRelease(kept["threshold"], kept["section"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _keep_release(path: Path, key: str, release: ThresholdRelease) -> None:
    """Best effort: without it a re-export asks again, and each client pays for a second release."""
    text = json.dumps({"key": key, "threshold": release.threshold, "section": release.section}, indent=1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda handle: handle.write(text.encode()))
    except OSError as err:
        logger.warning("federated threshold: the release could not be kept in %s (%s)", path, err)
