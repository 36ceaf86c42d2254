from torch import nn


def layernorm(d_model: int, eps: float = 1e-5, bias: bool = True) -> nn.LayerNorm:
    """Affine LayerNorm with biased variance (SOMA V1's norm_1, norm_2, final_norm)."""
    if eps <= 0:
        raise ValueError(f"eps: must be positive, got {eps}")
    return nn.LayerNorm(d_model, eps=eps, bias=bias)


def rmsnorm(d_model: int, eps: float = 1e-6) -> nn.RMSNorm:
    if eps <= 0:
        raise ValueError(f"eps: must be positive, got {eps}")
    return nn.RMSNorm(d_model, eps=eps)
