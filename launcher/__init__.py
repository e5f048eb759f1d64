"""launcher: train PyTorch models from a YAML recipe, on one process or many."""

__version__ = "0.1.0"
