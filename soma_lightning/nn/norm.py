from torch import nn

from soma_lightning.nn.protocols import check_positive


def layernorm(d_model: int, eps: float = 1e-5, bias: bool = True) -> nn.LayerNorm:
    """Affine LayerNorm with biased variance (SOMA V1's norm_1, norm_2, final_norm)."""
    check_positive(eps=eps)
    return nn.LayerNorm(d_model, eps=eps, bias=bias)


def rmsnorm(d_model: int, eps: float = 1e-6) -> nn.RMSNorm:
    check_positive(eps=eps)
    return nn.RMSNorm(d_model, eps=eps)
