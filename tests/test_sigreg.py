import pytest
import torch

from soma_lightning.nn.sigreg import sigreg_statistic, sigreg_statistic_reference


def _check_against_reference(scale: float, points: int, compiled: bool) -> None:
    x = (torch.randn(3, 50, 32) * scale).requires_grad_()
    noise = torch.randn(32, 256)
    fast = sigreg_statistic(x, noise, 3.0, points, compiled=compiled)
    (grad_fast,) = torch.autograd.grad(fast * 1.7, x)
    ref = sigreg_statistic_reference(x, noise, 3.0, points)
    (grad_ref,) = torch.autograd.grad(ref * 1.7, x)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad_fast, grad_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
@pytest.mark.parametrize("points", [17, 5])
def test_fast_sigreg_equals_reference_value_and_gradient(scale, points):
    _check_against_reference(scale, points, compiled=False)


def test_compiled_sigreg_equals_reference_value_and_gradient():
    """The rotation loops through torch.compile, as training with --model.compile true runs them."""
    _check_against_reference(1.0, 17, compiled=True)
