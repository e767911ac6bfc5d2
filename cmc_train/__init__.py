"""CMC training: the network, losses, data pipeline and semi-supervised trainer (PyTorch + MONAI)."""

__version__ = "0.1.0"
