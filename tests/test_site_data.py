"""A deployed site's own data file: read against the run's schema, and bad files answered, not raised."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from shared.config import FedaeConfig
from shared.data.errors import DataError
from shared.data.sources import DataSpec, load_server_data, load_site_file
from shared.ledger import PrivacyLedger, ledger_path
from shared.setup import DATA_ERROR, encode_setup
from shared.task import make_scaler, trainer_for

SPEC = DataSpec("tabular", (3,), ("a", "b", "c"))


def _site_file(path: Path, rows: int = 200, anomalies: int = 10, columns=("c", "a", "b")) -> Path:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(rows + anomalies, len(columns))), columns=list(columns))
    frame["label"] = [0] * rows + [1] * anomalies
    frame.to_csv(path, index=False)
    return path


def test_a_site_file_is_aligned_to_the_run_schema_and_split_like_a_simulated_site(tmp_path) -> None:
    path = _site_file(tmp_path / "site.csv")
    data = load_site_file(str(path), SPEC, "label", seed=1, client_id=0)
    frame = pd.read_csv(path)
    normal = frame[frame.label == 0][["a", "b", "c"]].to_numpy(np.float32)
    assert len(data.x_train) + len(data.x_holdout) == 200 and len(data.x_holdout) == 30
    # Every training row is a normal row, columns in the run's order (a, b, c), whatever the file's order.
    assert {tuple(r) for r in data.x_train} <= {tuple(r) for r in normal}
    assert data.y_labelled.sum() == 10 and len(data.y_labelled) == 30 + 10


@pytest.mark.parametrize(
    ("columns", "needle"),
    [(("a", "b"), "missing column(s) ['c']"), (("a", "b", "c", "d"), "unexpected column(s) ['d']")],
)
def test_a_site_file_with_other_columns_names_them(tmp_path, columns, needle: str) -> None:
    path = _site_file(tmp_path / "site.csv", columns=columns)
    with pytest.raises(DataError, match=r"site\.csv") as err:
        load_site_file(str(path), SPEC, "label", seed=1, client_id=0)
    assert needle in str(err.value)


def test_the_server_of_a_deployed_run_takes_the_schema_from_its_test_file(tmp_path) -> None:
    test = _site_file(tmp_path / "test.csv", rows=40, anomalies=10, columns=("a", "b", "c"))
    config = FedaeConfig(scenario="files", test_file=str(test), num_clients=3)
    assert config.deployed_files
    server = load_server_data(config)
    assert server.spec.feature_names == ("a", "b", "c")
    assert len(server.x_calibration) == 20 and server.y_test.sum() == 10


@pytest.mark.parametrize("problem", ["missing", "bad-cell"])
def test_the_client_app_answers_a_bad_site_file_with_an_error_naming_it(
    tmp_path, monkeypatch, problem
) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from client.app import train

    for name, value in (("_run_id", 1), ("_node_id", 5), ("_task_id", 1)):  # as a SuperNode sets them
        monkeypatch.setattr(TaskIdentity, name, value)

    test = _site_file(tmp_path / "test.csv", rows=40, columns=("a", "b", "c"))
    config = FedaeConfig(
        scenario="files", test_file=str(test), batch_size=16, state_dir=str(tmp_path / "state")
    )
    server = load_server_data(config)
    scaler = make_scaler(config, server.spec, server.x_calibration)
    weights = trainer_for(config, server.spec, scaler).get_weights()
    site_file = tmp_path / "site.csv"
    if problem == "bad-cell":
        frame = pd.read_csv(_site_file(site_file, columns=("a", "b", "c"))).astype(object)
        frame.loc[6, "b"] = "n/a"
        frame.to_csv(site_file, index=False)
    setup = encode_setup(config, server.spec, scaler, run_key="k") | {"server-round": 1}
    content = RecordDict({"arrays": ArrayRecord(weights), "config": ConfigRecord(setup)})
    msg = Message(content, dst_node_id=5, message_type="train")
    node_config = {"partition-id": 2, "site": "plant-b", "data-file": str(site_file)}
    context = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})
    reply = train(msg, context)
    assert reply.has_error() and reply.error.code == DATA_ERROR
    assert "site 'plant-b' (client-id=2)" in reply.error.reason and "site.csv" in reply.error.reason
    expected = (
        "file does not exist" if problem == "missing" else "row 7, column 'b': value 'n/a' is not a number"
    )
    assert expected in reply.error.reason
    with PrivacyLedger(ledger_path(tmp_path / "state", 2)) as ledger:
        assert ledger.events() == []  # nothing was charged for a round that could not train
