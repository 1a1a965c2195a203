import numpy as np

from shared.config import FedaeConfig
from shared.data.sources import DataSpec
from shared.preprocess import Scaler
from shared.setup import decode_setup, encode_setup


def test_setup_survives_the_trip_through_flat_values(rng) -> None:
    config = FedaeConfig(noise_multiplier=1.3, num_clients=4)
    spec = DataSpec("tabular", (3,), ("a", "b", "c"))
    scaler = Scaler.fit(rng.normal(size=(50, 3)).astype(np.float32), "tabular", None, flatten=True)
    values = encode_setup(config, spec, scaler)
    # Only what Flower's ConfigRecord can carry: scalars and flat lists of scalars.
    assert all(isinstance(v, int | float | str | bool | list) for v in values.values())
    values["server-round"] = 3  # Flower adds this key to the train config
    config2, spec2, scaler2 = decode_setup(values)
    assert config2 == config and spec2 == spec
    np.testing.assert_array_equal(scaler2.offset, scaler.offset)
    np.testing.assert_array_equal(scaler2.scale, scaler.scale)
