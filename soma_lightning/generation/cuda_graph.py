"""Static decoding and its CUDA graph: the one-token step over static caches (nn/decode.py), captured once
and replayed for every token, gpt-fast style. An eager step is many small kernel launches per layer and
host-bound at small batch; a replay is one launch.

Static decoding needs every module that decoding runs to keep no shape and no host value that depends on
the length (`static_blocker`; a component says so by `supports_static_decode()`, nn/protocols.py): `mha`,
`gqa` without a structural bias, `gelu_mlp`, in-block MTP heads, LayerNorm / RMSNorm and the plain token
embedding. Gated DeltaNet, SOSM's semantic state and graph attention, a structural bias, input embeddings
and MoE (routing with data-dependent shapes) decode on the eager cached path. The prompt's prefill stays
eager (its length varies) and fills the static caches.
"""

import itertools
import weakref

import torch
from torch import Tensor

from soma_lightning.nn.decode import DecodeState
from soma_lightning.nn.model import SomaModel
from soma_lightning.nn.protocols import supports_static_decode

STATIC_CAPACITY_STEP = 256  # static caches are sized in multiples of this, so that similar lengths share one graph
GRAPH_WARMUP = 3  # eager steps on a side stream before capture (lazy initialisation must not be captured)


def static_blocker(model: SomaModel) -> str | None:
    """None when every module that decoding runs supports static decoding (and so the CUDA graph);
    otherwise the first that does not, as `name (Type)`. Input embeddings never do: they read earlier tokens,
    which static decoding does not keep."""
    if len(model.input_embeddings):
        return f"input_embeddings.0 ({type(model.input_embeddings[0]).__name__})"
    modules = [("embedding", model.embedding), ("final_norm", model.final_norm)]
    modules += [(f"encoder.layers.{i}.{name}", m) for i, block in enumerate(model.encoder.layers) for name, m in block.named_children()]
    for name, module in modules:
        if not supports_static_decode(module):
            return f"{name} ({type(module).__name__})"
    return None


class StaticDecoder:
    """Static decoding of one model at one batch size: the state with its static caches (allocated by the
    first pass), the position tensor the state reads, and the one-token step, captured as a CUDA graph at its
    first use when `graph` and replayed from then on. Kept between `generate` calls (`static_decoder`), so
    that a model captures once per batch size and capacity."""

    def __init__(self, key: tuple, batch: int, capacity: int, device: torch.device, graph: bool) -> None:
        self.key, self.capacity, self.use_graph = key, capacity, graph
        self.state = DecodeState(capacity, position=torch.zeros((), dtype=torch.long, device=device))
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the step's input
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None  # the step's output, overwritten by every replay

    def _step(self, model: SomaModel) -> Tensor:
        return model.predict(model.extend(self.tokens, self.state)[0])

    def feed(self, model: SomaModel, new: Tensor, start: int) -> Tensor:
        """Feed `new` at positions start, start + 1, ...: the prompt [B, n] (start 0), then one token [B, 1]
        per step; -> logits [B, n, V]."""
        self.state.position.fill_(start)
        if start == 0:  # the prompt, eager (its length varies); the first one allocates the caches
            return model.predict(model.extend(new, self.state)[0])
        self.tokens.copy_(new)
        if not self.use_graph:
            return self._step(model)
        with torch.cuda.device(self.tokens.device):  # streams and replay belong to the current device
            if self.graph is None:
                self._capture(model)
            self.graph.replay()
        return self.logits

    def _capture(self, model: SomaModel) -> None:
        """Warm up on a side stream, then capture the step (the PyTorch recipe). Autocast's cache of cast
        weights is off meanwhile: the graph would keep reading the cast copies after the cache frees them."""
        autocast = torch.autocast("cuda", torch.get_autocast_dtype("cuda"), torch.is_autocast_enabled("cuda"), cache_enabled=False)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with autocast, torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP):  # each writes this step's keys and values, as every replay does
                self._step(model)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with autocast, torch.cuda.graph(self.graph):
            self.logits = self._step(model)


_static_decoders: "weakref.WeakKeyDictionary[SomaModel, StaticDecoder]" = weakref.WeakKeyDictionary()


def static_decoder(model: SomaModel, batch: int, length: int, device: torch.device, graph: bool) -> StaticDecoder:
    """The model's kept static decoder if it fits (the same batch size, parameter tensors and autocast
    setting, which a captured graph bakes in, and a capacity of at least `length`), else a new one in its
    place, its capacity `length` rounded up to STATIC_CAPACITY_STEP."""
    autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
    tensors = tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers()))
    key = (batch, device, graph, autocast, tensors)
    kept = _static_decoders.get(model)
    if kept is None or kept.key != key or kept.capacity < length:
        _static_decoders.pop(model, None)  # free its caches and graph before allocating the new ones
        capacity = -(-length // STATIC_CAPACITY_STEP) * STATIC_CAPACITY_STEP
        _static_decoders[model] = kept = StaticDecoder(key, batch, capacity, device, graph)
    return kept
