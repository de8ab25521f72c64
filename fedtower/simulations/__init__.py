"""Simulation helpers: splitting users into federated clients, and run-config presets."""
