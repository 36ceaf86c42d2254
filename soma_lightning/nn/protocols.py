"""The component contract: what a mixer, FFN, embedding or MTP component must provide, what it may provide,
and the helpers through which the rest of the package reads it. No code outside this module probes a
component for an optional member.

Every component must:
- take its arguments as typed keyword arguments of its constructor, plus the model-level `d_model`,
  `dropout`, `vocab_size` and `vocab_ranges` where it uses them (spec.py checks values against the
  annotations), and raise `ComponentArgumentError(arg, reason)` for a bad value: the spec error then names
  the argument's full YAML key path;
- be causal: position t reads nothing after t;
- have the forward of its kind:
    mixer, FFN        forward(x [B, T, D], ctx: SequenceContext) -> [B, T, D]
    input embedding   forward(tokens [B, T]) -> [B, T, D]
    token embedding   forward(tokens [B, T], ctx) -> [B, T, D]
    MTP               forward(x [B, T, D], ctx) -> list[MTPPrediction], and `horizons` (MultiTokenPredictor)

A component may provide any member of the protocols below; for a module without it, the helper named in
brackets gives the default. The protocols are structural: a user's module joins by defining the member.

    default_name                 module name of its sublayer                  [default_name: the kind]
    flops_per_token(seq_len)     forward FLOPs per token                      [flops_per_token: 2 per Linear weight]
    inactive_parameters()        parameters a token does not use (routing)    [inactive_parameters: 0]
    aux_losses(), aux_metrics()  training terms of the last forward           [auxiliary_terms: none]
    after_train_batch()          runs after each training batch               [after_train_batch: nothing]
    lookback                     earlier tokens an input embedding reads      [lookback: all]
    supports_static_decode()     its decode step can be a CUDA graph          [supports_static_decode: False]
    reads_structure()            reads ctx.structure                          [reads_structure: False]
    decoding()                   switches to what cached decoding reproduces  [decoding: no change]
    prepare_context(ctx)         builds the shared values of ctx it reads     [prepare_context: nothing]
    tensor_parallel_plan(tp)     how tensor parallelism over tp ranks shards  [tensor_parallel_plan: no
                                 it (nn/tensor_parallel.py)                    sharding, run whole per rank]
"""

import functools
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from torch.distributed.tensor.parallel import ParallelStyle


class ComponentArgumentError(ValueError):
    """A bad constructor argument of a component; the message reads "arg: reason"."""

    def __init__(self, arg: str, reason: str) -> None:
        super().__init__(f"{arg}: {reason}")
        self.arg, self.reason = arg, reason


def check_positive(**values: int | float) -> None:
    """ComponentArgumentError for the first of `values` (argument name = value) that is not positive."""
    for arg, value in values.items():
        if value <= 0:
            raise ComponentArgumentError(arg, f"must be positive, got {value}")


# ---------------------------------------------------------------- required of MTP components


@runtime_checkable
class MultiTokenPredictor(Protocol):
    """An MTP component: its forward returns one MTPPrediction per horizon and adds nothing to the stream."""

    horizons: int


def mtp_horizons(module: nn.Module) -> int:
    """The number of horizons an MTP component predicts; 0 for a module that is not one."""
    return module.horizons if isinstance(module, MultiTokenPredictor) else 0


# ---------------------------------------------------------------- optional members


@runtime_checkable
class Named(Protocol):
    default_name: ClassVar[str]  # the sublayer's module name when the spec gives none, e.g. "attention"


@runtime_checkable
class CountsFlops(Protocol):
    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token of a training pass over `seq_len` tokens (matrix products only)."""


@runtime_checkable
class Routed(Protocol):
    def inactive_parameters(self) -> int:
        """Parameters a token does not use (the experts it is not routed to); read on the meta device."""


@runtime_checkable
class AuxiliaryLosses(Protocol):
    """Terms of the last forward besides the model's loss (MoE balancing, SOSM's MU regularisers), both empty
    before the first forward. SomaLM logs each as train/{name}."""

    def aux_losses(self) -> dict[str, Tensor]:
        """Scalar losses added to the training loss; a name several modules report is summed."""

    def aux_metrics(self) -> dict[str, Tensor]:
        """Detached statistics; a name several modules report is averaged."""


@runtime_checkable
class TrainBatchHook(Protocol):
    def after_train_batch(self) -> None:
        """Called after each training batch, after the optimizer step when one ran (MoE's aux-free bias)."""


@runtime_checkable
class LooksBack(Protocol):
    lookback: int  # an input embedding's earlier tokens that a position's embedding reads


@runtime_checkable
class StaticDecodable(Protocol):
    def supports_static_decode(self) -> bool:
        """Whether its cached one-token step keeps no shape or host value that depends on the length, so that
        it runs over static caches and in a CUDA graph (generation/cuda_graph.py)."""


@runtime_checkable
class ReadsStructure(Protocol):
    def reads_structure(self) -> bool:
        """Whether its forward reads ctx.structure, so that decoding must scan the structure of new tokens."""


@runtime_checkable
class PreparesContext(Protocol):
    def prepare_context(self, ctx) -> None:
        """Build the values of the SequenceContext that its forward reads and other layers share (RoPE tables,
        attention masks), as its forward would on first use. The encoder calls it before the blocks run, so
        that every block finds them built: one compiled graph then serves all the blocks of one kind, where a
        block that built them would need a graph of its own."""


@runtime_checkable
class DecodeMode(Protocol):
    def decoding(self) -> AbstractContextManager[None]:
        """For the duration, compute the function that cached decoding can reproduce, where training computes
        another (MoE: no capacity dropping, which depends on how many tokens share the pass)."""


@runtime_checkable
class TensorParallel(Protocol):
    def tensor_parallel_plan(self, tp: int) -> dict[str, "ParallelStyle"]:
        """DTensor ParallelStyles by submodule name ("" for the component's own parameters) that shard it over
        `tp` ranks (tp >= 2), as torch's `parallelize_module` applies them; raises ComponentArgumentError
        naming the argument that tp must divide. Every rank gets the same input and must return the same
        output; a parameter left out stays whole on every rank and must get the same gradient on each (its
        computation sees whole tensors), or be handled by a style (SequenceParallel for a norm over
        head-split activations). An empty plan runs the component whole on every rank."""


# ---------------------------------------------------------------- the helpers that read them


@functools.cache
def _class_provides(cls: type, protocol: type) -> bool:
    return issubclass(cls, protocol)


def _provides(module: object, protocol: type) -> bool:
    """isinstance for a protocol of methods, answered once per class: SomaLM asks it of every module every step."""
    return _class_provides(type(module), protocol)


def default_name(factory: Callable[..., nn.Module], kind: str) -> str:
    return factory.default_name if isinstance(factory, Named) else kind


def linear_flops(module: nn.Module) -> float:
    """Forward FLOPs per token of the Linear layers inside `module`: 2 per weight."""
    return sum(2.0 * m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def flops_per_token(module: nn.Module, seq_len: int) -> float:
    return module.flops_per_token(seq_len) if _provides(module, CountsFlops) else linear_flops(module)


def inactive_parameters(model: nn.Module) -> int:
    """Summed over the modules of `model`."""
    return sum(m.inactive_parameters() for m in model.modules() if _provides(m, Routed))


def auxiliary_terms(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(losses, metrics) of the last forward of `model`'s modules, in module order: each loss summed over the
    modules that report it, each metric averaged."""
    losses: dict[str, Tensor] = {}
    metrics: dict[str, list[Tensor]] = {}
    for m in model.modules():
        if _provides(m, AuxiliaryLosses):
            for name, value in m.aux_losses().items():
                losses[name] = losses[name] + value if name in losses else value
            for name, value in m.aux_metrics().items():
                metrics.setdefault(name, []).append(value)
    return losses, {name: torch.stack(values).mean() for name, values in metrics.items()}


def after_train_batch(model: nn.Module) -> None:
    for m in model.modules():
        if _provides(m, TrainBatchHook):
            m.after_train_batch()


def lookback(embedding: nn.Module, default: int) -> int:
    """An input embedding's `lookback`; `default` (all tokens so far) for one that does not state it."""
    return embedding.lookback if isinstance(embedding, LooksBack) else default


# torch's own layers that decoding runs and that keep nothing of the length: the token table, norms, dropout.
STATIC_TORCH_MODULES = (nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.Dropout)


def supports_static_decode(module: nn.Module) -> bool:
    if _provides(module, StaticDecodable):
        return module.supports_static_decode()
    return isinstance(module, STATIC_TORCH_MODULES)


def reads_structure(model: nn.Module) -> bool:
    """Whether any module of `model` reads ctx.structure."""
    return any(m.reads_structure() for m in model.modules() if _provides(m, ReadsStructure))


def prepare_context(model: nn.Module, ctx) -> None:
    for m in model.modules():
        if _provides(m, PreparesContext):
            m.prepare_context(ctx)


def tensor_parallel_plan(module: nn.Module, tp: int) -> dict[str, "ParallelStyle"]:
    return module.tensor_parallel_plan(tp) if _provides(module, TensorParallel) else {}


@contextmanager
def decoding(model: nn.Module) -> Iterator[None]:
    """Every module of `model` in its `decoding()` mode for the duration."""
    with ExitStack() as stack:
        for m in model.modules():
            if _provides(m, DecodeMode):
                stack.enter_context(m.decoding())
        yield
