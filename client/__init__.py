"""fedae's Flower ClientApp: glue between Flower messages and ``shared.task``."""
