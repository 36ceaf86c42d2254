"""Lightning callbacks, installed as `soma_lightning.callbacks`."""

from soma_lightning.callbacks.attribution import K1Attribution
from soma_lightning.callbacks.monitors import BlockNormMonitor, ExpertLoadMonitor, GraphMonitor
from soma_lightning.callbacks.nonfinite import NonFiniteGuard
from soma_lightning.callbacks.preemption import PreemptionCheckpoint
from soma_lightning.callbacks.run_info import RunInfo
from soma_lightning.callbacks.safetensors_export import SafetensorsExport, load_exported
from soma_lightning.callbacks.throughput import Throughput

__all__ = [
    "BlockNormMonitor", "ExpertLoadMonitor", "GraphMonitor", "K1Attribution", "NonFiniteGuard", "PreemptionCheckpoint", "RunInfo",
    "SafetensorsExport", "Throughput", "load_exported",
]
