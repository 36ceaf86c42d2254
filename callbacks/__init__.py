"""Lightning callbacks, installed as `soma_lightning.callbacks`."""

from soma_lightning.callbacks.attribution import K1Attribution
from soma_lightning.callbacks.decomposition import DecompositionMonitor
from soma_lightning.callbacks.evaluation import Evaluation
from soma_lightning.callbacks.lora import LoRA, load_adapter, merge_lora
from soma_lightning.callbacks.monitors import BlockNormMonitor, ExpertLoadMonitor, GraphMonitor
from soma_lightning.callbacks.nonfinite import NonFiniteGuard
from soma_lightning.callbacks.preemption import PreemptionCheckpoint
from soma_lightning.callbacks.run_info import RunInfo
from soma_lightning.callbacks.safetensors_export import SafetensorsExport, load_exported
from soma_lightning.callbacks.throughput import Throughput

__all__ = [
    "BlockNormMonitor", "DecompositionMonitor", "Evaluation", "ExpertLoadMonitor", "GraphMonitor", "K1Attribution", "LoRA", "NonFiniteGuard", "PreemptionCheckpoint", "RunInfo",
    "SafetensorsExport", "Throughput", "load_adapter", "load_exported", "merge_lora",
]
