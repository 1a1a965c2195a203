"""fedae: privacy-preserving federated autoencoders for anomaly detection (the ``fedae`` command)."""

__version__ = "0.1.0"
