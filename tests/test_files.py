"""Site files: readers, schema checks, and the messages bad input gets (file, row, column, reason)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from shared.config import ConfigError, FedaeConfig
from shared.data.errors import DataError
from shared.data.files import read_table
from shared.data.sources import load_client_data, load_server_data, num_clients_for


def write_sites(folder: Path, rng: np.random.Generator, n: int = 120, columns=("a", "b", "c")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for site in range(3):
        frame = pd.DataFrame(rng.normal(site, 1.0, (n, len(columns))), columns=list(columns))
        frame.to_csv(folder / f"site{site}.csv", index=False)
    return folder


def write_test(path: Path, rng: np.random.Generator, columns=("a", "b", "c")) -> Path:
    x = np.vstack([rng.normal(0, 1, (60, len(columns))), rng.normal(6, 1, (20, len(columns)))])
    frame = pd.DataFrame(x, columns=list(columns))
    frame["label"] = [0] * 60 + [1] * 20
    frame.to_csv(path, index=False)
    return path


def test_files_become_clients_in_name_order_with_calibration_from_the_test_file(tmp_path, rng) -> None:
    data = write_sites(tmp_path / "sites", rng)
    test = write_test(tmp_path / "test.csv", rng)
    config = FedaeConfig(scenario="files", data_dir=str(data), test_file=str(test), batch_size=8)
    assert num_clients_for(config) == 3
    client = load_client_data(config, 2)
    assert len(client.x_train) + len(client.x_holdout) == 120
    assert abs(client.x_train.mean() - 2.0) < 0.3  # site2.csv was drawn around 2
    server = load_server_data(config)
    assert len(server.x_calibration) == 30 and len(server.y_test) == 50 and server.y_test.sum() == 20


def test_parquet_and_npz_are_read_and_columns_matched_by_name(tmp_path, rng) -> None:
    frame = pd.DataFrame(rng.normal(size=(10, 3)), columns=["c", "a", "b"])
    frame.to_parquet(tmp_path / "s.parquet")
    table = read_table(tmp_path / "s.parquet")
    assert table.feature_names == ("c", "a", "b") and table.x.shape == (10, 3)
    np.savez(tmp_path / "img.npz", x=rng.random((6, 8, 8)), y=np.array([0, 0, 0, 1, 0, 1]))
    images = read_table(tmp_path / "img.npz")
    assert images.x.shape == (6, 8, 8, 1) and images.labels.tolist() == [0, 0, 0, 1, 0, 1]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("a,b\n1,2\n3,oops\n", "row 2, column 'b': value 'oops' is not a number"),
        ("a,b\n1,2\n3,\n", "row 2, column 'b': value is missing (empty or NaN)"),
        ("a,b\n1,2\ninf,4\n", "row 2, column 'a': value inf is infinite"),
        ("a,label\n1,0\n2,7\n", "row 2, column 'label': label 7 is not 0"),
        ("", "cannot be read as CSV"),
    ],
)
def test_bad_cells_name_file_row_and_column(tmp_path, content: str, needle: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        read_table(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_missing_file_and_wrong_npz_shape(tmp_path, rng) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_table(tmp_path / "nope.csv")
    np.savez(tmp_path / "bad.npz", x=rng.random((2, 3, 4, 5, 6)))
    with pytest.raises(DataError, match="must be \\[rows, features\\]"):
        read_table(tmp_path / "bad.npz")


def test_inconsistent_columns_across_sites_are_refused(tmp_path, rng) -> None:
    data = write_sites(tmp_path / "sites", rng)
    pd.DataFrame(rng.normal(size=(50, 3)), columns=["a", "b", "zzz"]).to_csv(data / "site9.csv", index=False)
    config = FedaeConfig(
        scenario="files", data_dir=str(data), test_file=str(write_test(tmp_path / "t.csv", rng))
    )
    with pytest.raises(DataError) as info:
        load_client_data(config, 0)
    assert "site9.csv" in str(info.value) and "missing ['c'], extra ['zzz']" in str(info.value)


def test_embedded_scenarios_without_natural_sites_need_iid_or_dirichlet() -> None:
    with pytest.raises(ConfigError, match="no natural sites"):
        load_client_data(FedaeConfig(scenario="wdbc", partition="natural", num_clients=2), 0)


def test_one_class_splits_are_disjoint_and_labelled() -> None:
    config = FedaeConfig(scenario="digits", model="conv", partition="iid", num_clients=2, normal_classes="3")
    server = load_server_data(config)
    clients = [load_client_data(config, c) for c in range(2)]
    assert server.spec.input_shape == (8, 8, 1)
    train = np.concatenate([c.x_train for c in clients] + [c.x_holdout for c in clients])
    # No training image appears in the calibration or test sets.
    seen = {row.tobytes() for row in train}
    assert not any(row.tobytes() in seen for row in server.x_calibration)
    assert not any(row.tobytes() in seen for row in server.x_test[server.y_test == 0])
    assert 0.8 < server.y_test.mean() < 1.0  # the nine other digits are anomalies


def test_mnist_from_a_local_npz(tmp_path, rng) -> None:
    labels = np.arange(200) % 10
    np.savez(
        tmp_path / "mnist.npz",
        x_train=rng.integers(0, 255, (200, 28, 28)),
        y_train=labels,
        x_test=rng.integers(0, 255, (50, 28, 28)),
        y_test=labels[:50],
    )
    config = FedaeConfig(
        scenario="mnist", model="conv", partition="iid", num_clients=2, data_dir=str(tmp_path), batch_size=4
    )
    client = load_client_data(config, 0)
    assert client.x_train.shape[1:] == (28, 28, 1)
    assert load_server_data(config).y_test.sum() == 45
    with pytest.raises(DataError, match=r"mnist\.npz"):
        load_server_data(config.replace(data_dir=str(tmp_path / "elsewhere")))


def test_image_shapes_must_agree_across_sites_and_with_the_test_file(tmp_path, rng) -> None:
    data = tmp_path / "imgs"
    data.mkdir()
    np.savez(data / "a.npz", x=rng.random((40, 8, 8)))
    np.savez(data / "b.npz", x=rng.random((40, 12, 12)))
    np.savez(tmp_path / "test.npz", x=rng.random((10, 8, 8)), y=np.array([0] * 8 + [1] * 2))
    config = FedaeConfig(
        scenario="files", model="conv", data_dir=str(data), test_file=str(tmp_path / "test.npz")
    )
    with pytest.raises(DataError) as info:
        load_client_data(config, 0)
    assert "b.npz" in str(info.value) and "shape (12, 12, 1) differs" in str(info.value)


def test_a_sites_labelled_anomalies_never_train_and_its_evaluation_set_holds_no_training_row(
    tmp_path, rng
) -> None:
    data = write_sites(tmp_path / "sites", rng)
    frame = pd.read_csv(data / "site0.csv")
    frame["label"] = [0] * 100 + [1] * 20
    frame.to_csv(data / "site0.csv", index=False)
    config = FedaeConfig(
        scenario="files", data_dir=str(data), test_file=str(write_test(tmp_path / "t.csv", rng))
    )
    client = load_client_data(config, 0)
    assert len(client.x_train) + len(client.x_holdout) == 100
    assert client.y_labelled.tolist() == [0] * len(client.x_holdout) + [1] * 20
    training = {row.tobytes() for row in client.x_train}
    assert not any(row.tobytes() in training for row in client.x_labelled)
