"""Lightning callbacks, installed as `soma_lightning.callbacks`."""

from soma_lightning.callbacks.throughput import Throughput

__all__ = ["Throughput"]
