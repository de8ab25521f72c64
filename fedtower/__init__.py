"""fedtower: federated, differentially private two-tower recommendation on Flower."""

__version__ = "0.1.0"
