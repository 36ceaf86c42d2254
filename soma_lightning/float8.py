"""float8 training through torchao (`--model.float8 true`, the `float8` extra), torchtitan's recipe: the
Linear layers inside the blocks run their three matmuls (output, input gradient, weight gradient) in float8
with dynamic per-tensor scales, e4m3 forward and e5m2 for gradients. Weights stay in their dtype and keep
their state-dict keys, so checkpoints, resume and `export` are unchanged. The embeddings, the predictor, MoE
experts (grouped GEMMs) and Linear layers with a dimension not divisible by 16 (float8 GEMMs need it) keep
their precision. It pays only on GPUs with float8 tensor cores (H100) and with `--model.compile true`, which
fuses the scaling and casts into the neighbouring kernels."""

from torch import nn

from soma_lightning.errors import UserError
from soma_lightning.nn.model import SomaModel


def require_torchao() -> None:
    try:
        import torchao.float8  # noqa: F401
    except ImportError as e:
        raise UserError(f"model.float8: needs torchao ({e}); pip install 'soma-lightning[float8]'") from None


def _eligible(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert_blocks_to_float8(model: SomaModel) -> None:
    """Swap the eligible Linear layers of the model's blocks for torchao's Float8Linear, in place."""
    require_torchao()
    from torchao.float8 import convert_to_float8_training

    convert_to_float8_training(model.encoder, module_filter_fn=_eligible)
