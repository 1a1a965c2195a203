"""Scenario files and the runner behind ``fedae simulate`` (Flower's Simulation Engine)."""
