"""Task code shared by the ServerApp and the ClientApp: config, data, models, DP training, privacy
accounting, detector and report. Nothing in this package imports ``flwr``."""
