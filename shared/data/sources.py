"""Where each scenario's data comes from, and how it is split between clients, server and test.

Every scenario yields three disjoint parts:

- per client: training rows (normal only) and a local held-out part for federated evaluation;
- the server's calibration set: normal rows held by the coordinator (a reference data set it owns,
  e.g. the manufacturer's test-bench vehicles), never any client's. The scaler and the anomaly
  threshold are fitted on it, so no client statistic leaves a client for preprocessing;
- a labelled test set (1 = anomaly) used only to report detection quality.

Client data is materialised lazily: a client builds only its own part (for natural partitions); pooled
sources (IID / Dirichlet re-partitions, the one-class data sets) are built once per process and indexed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from shared.config import ConfigError, FedaeConfig
from shared.data import fleet, partition
from shared.data.errors import DataError
from shared.data.files import Table, align_columns, check_consistent, list_site_files, read_table

FLEET_CALIBRATION_ROWS = 2500
# With more sites than this, the coordinator's calibration and test vehicles come from this many sites
# spread evenly over the site numbers (so over every archetype and shift): its data then stays the same
# size however many sites join, instead of growing by eight test vehicles per site.
FLEET_REFERENCE_SITES = 20
LOCAL_HOLDOUT_FRACTION = 0.15


@dataclass(frozen=True)
class DataSpec:
    """What the model sees: feature names (tabular) or image shape, and the known value range."""

    kind: str  # "tabular" | "image"
    input_shape: tuple[int, ...]
    feature_names: tuple[str, ...] = ()
    # Publicly known range of raw values (pixel range); scaling by it reveals nothing about any client.
    value_range: tuple[float, float] | None = None
    protocol: str = ""


@dataclass
class ClientData:
    client_id: int
    x_train: np.ndarray
    x_holdout: np.ndarray
    x_labelled: np.ndarray | None = None
    y_labelled: np.ndarray | None = None

    @property
    def num_examples(self) -> int:
        return len(self.x_train)


@dataclass
class ServerData:
    spec: DataSpec
    x_calibration: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    notes: list[str] = field(default_factory=list)


def num_clients_for(config: FedaeConfig) -> int:
    """Clients in this run: one per file for simulated site files with natural partitioning, else
    ``num-clients`` (deployed, the number of sites expected)."""
    if config.sites_are_files:
        return len(list_site_files(config.data_dir))
    return config.num_clients


def _holdout_size(num_rows: int) -> int:
    return max(1, round(num_rows * LOCAL_HOLDOUT_FRACTION))


def _split_holdout(x: np.ndarray, seed: int, client_id: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng([seed, client_id, 7]).permutation(len(x))
    cut = _holdout_size(len(x))
    return x[order[cut:]], x[order[:cut]]


# -- fleet ----------------------------------------------------------------------------------------------
def _fleet_spec() -> DataSpec:
    return DataSpec(
        "tabular",
        (len(fleet.feature_names()),),
        tuple(fleet.feature_names()),
        protocol="normal = fault-free telemetry; anomaly = snapshots with an active fault "
        "(cell degradation, stuck sensor, thermal-runaway onset, spike)",
    )


def _fleet_client(config: FedaeConfig, client_id: int) -> np.ndarray:
    if config.partition == "natural":
        return fleet.normal_rows(config.seed, client_id, config.rows_per_site)
    pool = _fleet_pool(config.seed, config.num_clients, config.rows_per_site)
    groups = np.repeat(np.arange(config.num_clients), config.rows_per_site)
    return pool[_pooled_parts(config, groups)[client_id]]


@lru_cache(maxsize=1)
def _fleet_pool(seed: int, num_sites: int, rows_per_site: int) -> np.ndarray:
    """Every site's rows, for IID / Dirichlet re-partitioning: generated once per process, not once per
    client (a worker serving many clients would otherwise regenerate the whole fleet for each)."""
    return np.concatenate([fleet.normal_rows(seed, s, rows_per_site) for s in range(num_sites)])


def reference_sites(num_sites: int) -> list[int]:
    """The sites the coordinator's calibration and test vehicles come from: all, up to 20; beyond, four
    of each of the fleet's five archetypes (site k is archetype k mod 5), spread over its shifts."""
    if num_sites <= FLEET_REFERENCE_SITES:
        return list(range(num_sites))
    archetypes = fleet.NUM_ARCHETYPES
    per_archetype = FLEET_REFERENCE_SITES // archetypes
    sites: set[int] = set()
    for archetype in range(archetypes):
        last_cycle = (num_sites - 1 - archetype) // archetypes
        cycles = np.linspace(0, last_cycle, per_archetype).round().astype(int)
        sites.update(archetype + archetypes * int(c) for c in cycles)
    return sorted(sites)


def _fleet_server(config: FedaeConfig) -> ServerData:
    sites = reference_sites(config.num_clients)
    # The coordinator's reference vehicles: drawn from every site's operating conditions, but separate
    # vehicles (purpose 1) from any client's.
    per_site = max(100, FLEET_CALIBRATION_ROWS // len(sites))
    calibration = np.concatenate([fleet.normal_rows(config.seed, s, per_site, purpose=1) for s in sites])
    x_test, y_test = fleet.test_rows(config.seed, sites)
    return ServerData(_fleet_spec(), calibration, x_test, y_test)


# -- scikit-learn's embedded data sets and local MNIST ---------------------------------------------------
@lru_cache(maxsize=2)
def _sklearn_set(name: str) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets

    if name == "digits":
        bunch = datasets.load_digits()
        return bunch.images.astype(np.float32)[..., None], bunch.target.astype(np.int64)
    bunch = datasets.load_breast_cancer()
    # WDBC targets: 0 = malignant, 1 = benign; fedae's labels: 1 = anomaly (malignant).
    return bunch.data.astype(np.float32), (bunch.target == 0).astype(np.int64)


def _load_mnist(data_dir: str) -> dict[str, np.ndarray]:
    path = Path(data_dir or ".") / "mnist.npz"
    if not path.exists():
        raise DataError(
            "MNIST needs a local mnist.npz (keys x_train, y_train, x_test, y_test); "
            "set data-dir to its folder",
            path=str(path),
        )
    with np.load(path, allow_pickle=False) as archive:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in archive.files]
        if missing:
            raise DataError(f"missing array(s) {missing}", path=str(path))
        return {k: archive[k] for k in ("x_train", "y_train", "x_test", "y_test")}


@dataclass
class _OneClassSplit:
    spec: DataSpec
    client_pool: np.ndarray
    client_groups: np.ndarray
    calibration: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def _one_class(config: FedaeConfig) -> _OneClassSplit:
    """Normal = ``normal-classes`` (digits, MNIST) or benign (WDBC); everything else is an anomaly."""
    # Cached on what the split depends on: every client of a worker indexes the same split, and MNIST
    # would otherwise be read from disk once per client.
    return _one_class_split(config.scenario, config.seed, config.data_dir, tuple(config.normal_class_list))


@lru_cache(maxsize=2)
def _one_class_split(
    scenario: str, seed: int, data_dir: str, normal_classes: tuple[int, ...]
) -> _OneClassSplit:
    rng = np.random.default_rng([seed, 3])
    if scenario == "mnist":
        arrays = _load_mnist(data_dir)
        normal = set(list(normal_classes))
        train_x = arrays["x_train"].astype(np.float32)[..., None]
        keep = np.isin(arrays["y_train"], list(normal))
        pool, groups = train_x[keep], arrays["y_train"][keep]
        order = rng.permutation(len(pool))
        cut = int(0.15 * len(pool))
        test_y = (~np.isin(arrays["y_test"], list(normal))).astype(np.int64)
        spec = DataSpec(
            "image",
            (28, 28, 1),
            value_range=(0.0, 255.0),
            protocol=f"one-class: digits {sorted(normal)} normal, all other digits anomalies",
        )
        return _OneClassSplit(
            spec,
            pool[order[cut:]],
            groups[order[cut:]],
            pool[order[:cut]],
            arrays["x_test"].astype(np.float32)[..., None],
            test_y,
        )
    x, y = _sklearn_set(scenario)
    if scenario == "digits":
        normal = list(normal_classes)
        is_normal = np.isin(y, normal)
        groups_all = y
        spec = DataSpec(
            "image",
            (8, 8, 1),
            value_range=(0.0, 16.0),
            protocol=f"one-class: digit(s) {normal} normal, the other digits anomalies",
        )
    else:
        is_normal = y == 0
        groups_all = np.zeros_like(y)
        from sklearn.datasets import load_breast_cancer

        spec = DataSpec(
            "tabular",
            (x.shape[1],),
            tuple(load_breast_cancer().feature_names),
            protocol="benign tumours normal, malignant anomalies",
        )
    normal_idx = rng.permutation(np.flatnonzero(is_normal))
    n_client = int(0.6 * len(normal_idx))
    n_cal = int(0.15 * len(normal_idx))
    client_idx, cal_idx, test_normal = np.split(normal_idx, [n_client, n_client + n_cal])
    test_idx = np.concatenate([test_normal, np.flatnonzero(~is_normal)])
    return _OneClassSplit(
        spec,
        x[client_idx],
        groups_all[client_idx],
        x[cal_idx],
        x[test_idx],
        (~is_normal[test_idx]).astype(np.int64),
    )


# -- user files ------------------------------------------------------------------------------------------
@lru_cache(maxsize=4)
def _site_tables(data_dir: str, label_column: str) -> tuple[Table, ...]:
    tables = [read_table(p, label_column) for p in list_site_files(data_dir)]
    check_consistent(tables)
    return tuple(tables)


def _files_spec(first: Table) -> DataSpec:
    if first.is_image:
        return DataSpec("image", tuple(first.x.shape[1:]), protocol="rows labelled 1 are anomalies")
    return DataSpec(
        "tabular", (first.x.shape[1],), first.feature_names, protocol="rows labelled 1 are anomalies"
    )


def _normal_rows(table: Table, names: tuple[str, ...]) -> np.ndarray:
    x = align_columns(table, names)
    return x if table.labels is None else x[table.labels == 0]


def _files_server(config: FedaeConfig) -> ServerData:
    if not config.test_file:
        raise ConfigError("scenario 'files' needs a labelled test file (--test FILE / test-file)")
    test = read_table(config.test_file, config.label_column, require_labels=True)
    if config.deployed_files:
        # Deployed, the sites' files are on the sites: the schema is the test file's, and each site
        # checks its own file against it (load_site_file).
        spec = _files_spec(test)
    else:
        tables = _site_tables(config.data_dir, config.label_column)
        spec = _files_spec(tables[0])
        check_consistent([tables[0], test])
    x = align_columns(test, spec.feature_names)
    if test.labels is None:  # read_table(require_labels=True) guarantees labels; keep mypy and readers honest
        raise DataError(f"no label column {config.label_column!r}", path=config.test_file)
    normal = np.flatnonzero(test.labels == 0)
    if len(normal) < 4:
        raise DataError(
            f"needs at least 4 normal rows (label 0) for calibration and evaluation, has {len(normal)}",
            path=config.test_file,
            column=config.label_column,
        )
    # The test file's normal rows are split in half: one half calibrates scaler and threshold (the
    # coordinator's reference data), the other half and all anomalies measure detection.
    normal = np.random.default_rng([config.seed, 5]).permutation(normal)
    calibration = normal[: len(normal) // 2]
    evaluation = np.sort(np.concatenate([normal[len(normal) // 2 :], np.flatnonzero(test.labels == 1)]))
    notes = [
        f"calibration: {len(calibration)} normal rows of {Path(config.test_file).name}; "
        f"evaluation: the other {len(evaluation)} rows"
    ]
    return ServerData(spec, x[calibration], x[evaluation], test.labels[evaluation], notes)


# -- public entry points -----------------------------------------------------------------------------------
def _pooled_parts(config: FedaeConfig, groups: np.ndarray) -> list[np.ndarray]:
    rng = np.random.default_rng([config.seed, 11])
    try:
        if config.partition == "dirichlet":
            return partition.dirichlet(
                groups,
                config.num_clients,
                config.dirichlet_alpha,
                rng,
                min_size=max(2, config.batch_size // 4),
            )
        return partition.iid(len(groups), config.num_clients, rng)
    except ValueError as err:
        raise ConfigError(str(err)) from err


def data_spec(config: FedaeConfig) -> DataSpec:
    if config.scenario == "fleet":
        return _fleet_spec()
    if config.deployed_files:
        return _files_spec(read_table(config.test_file, config.label_column, require_labels=True))
    if config.scenario == "files":
        return _files_spec(_site_tables(config.data_dir, config.label_column)[0])
    return _one_class(config).spec


def load_site_file(path: str, spec: DataSpec, label_column: str, seed: int, client_id: int) -> ClientData:
    """A deployed site's own data file, checked against the run's schema ``spec`` (feature names or image
    shape, from the server): training rows are its normal rows, split like a simulated site's."""
    table = read_table(path, label_column)
    if spec.kind == "image":
        if not table.is_image or table.x.shape[1:] != spec.input_shape:
            raise DataError(
                f"rows have shape {table.x.shape[1:]}, the run expects {spec.input_shape}", path=path
            )
    elif table.is_image:
        raise DataError(
            f"holds images {table.x.shape[1:]}, the run expects columns {list(spec.feature_names)}", path=path
        )
    x = align_columns(table, spec.feature_names)
    if table.labels is not None and not (table.labels == 0).any():
        raise DataError(f"no normal rows ({label_column} 0) to train on", path=path)
    return _site_part(x, table.labels, seed, client_id)


def _site_part(x: np.ndarray, labels: np.ndarray | None, seed: int, client_id: int) -> ClientData:
    """One site's rows (simulated site file or deployed data-file): its normal rows train, less a held-out
    part; labelled anomalies never train and, with the held-out normal rows, give its evaluation AUC (so
    no training row is scored in it)."""
    normal = x if labels is None else x[labels == 0]
    x_train, x_holdout = _split_holdout(normal, seed, client_id)
    if labels is None or not labels.any():
        return ClientData(client_id, x_train, x_holdout)
    anomalies = x[labels == 1]
    flags = np.concatenate([np.zeros(len(x_holdout), np.int64), np.ones(len(anomalies), np.int64)])
    return ClientData(client_id, x_train, x_holdout, np.concatenate([x_holdout, anomalies]), flags)


def load_client_data(config: FedaeConfig, client_id: int) -> ClientData:
    """The training and local held-out rows of client ``client_id`` (0-based)."""
    if config.deployed_files:
        raise ConfigError(
            "deployed site files: each site's SuperNode names its own data-file (node config); the "
            "server holds no client data"
        )
    total = num_clients_for(config)
    if not 0 <= client_id < total:
        raise ConfigError(f"client id {client_id} out of range for {total} clients")
    if config.scenario == "fleet":
        rows = _fleet_client(config, client_id)
    elif config.scenario == "files":
        tables = _site_tables(config.data_dir, config.label_column)
        names = tables[0].feature_names
        if config.partition == "natural":
            table = tables[client_id]
            return _site_part(align_columns(table, names), table.labels, config.seed, client_id)
        else:
            pool = np.concatenate([_normal_rows(t, names) for t in tables])
            groups = np.concatenate([np.full(len(_normal_rows(t, names)), i) for i, t in enumerate(tables)])
            rows = pool[_pooled_parts(config, groups)[client_id]]
    else:
        if config.partition == "natural":
            raise ConfigError(
                f"scenario {config.scenario!r} has no natural sites; use partition = 'iid' or 'dirichlet'"
            )
        split = _one_class(config)
        rows = split.client_pool[_pooled_parts(config, split.client_groups)[client_id]]
    x_train, x_holdout = _split_holdout(rows, config.seed, client_id)
    return ClientData(client_id, x_train, x_holdout)


def client_train_rows(config: FedaeConfig, client_id: int) -> int:
    """How many training rows client ``client_id`` has, without generating a fleet site's rows: a
    simulation checks every client before it starts, and generating 1,000 sites up front would cost
    minutes for rows the clients then generate again, lazily, when they are sampled."""
    if config.scenario == "fleet" and config.partition == "natural":
        return config.rows_per_site - _holdout_size(config.rows_per_site)
    return load_client_data(config, client_id).num_examples


def load_server_data(config: FedaeConfig) -> ServerData:
    """The coordinator's calibration rows and the labelled test split."""
    if config.scenario == "fleet":
        return _fleet_server(config)
    if config.scenario == "files":
        return _files_server(config)
    split = _one_class(config)
    return ServerData(split.spec, split.calibration, split.x_test, split.y_test)
