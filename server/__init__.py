"""fedae's Flower ServerApp: strategy set-up, round bookkeeping, and the hand-off to ``shared``."""
