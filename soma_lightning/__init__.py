"""soma-lightning: declarative SOMA-family language models on PyTorch Lightning."""

from typing import TYPE_CHECKING, Any

from soma_lightning.errors import SpecError

if TYPE_CHECKING:
    from soma_lightning.loading import load
    from soma_lightning.components import register
    from soma_lightning.spec import ModelSpec, build_model, load_spec

__all__ = ["ModelSpec", "SpecError", "build_model", "load", "load_spec", "register"]


def __getattr__(name: str) -> Any:
    """The names of soma_lightning.spec, imported on first use: a subpackage (soma_lightning.data_modules, say)
    can then be imported without the model code that spec.py pulls in."""
    if name in ("ModelSpec", "build_model", "load_spec"):
        from soma_lightning import spec

        return getattr(spec, name)
    if name == "register":
        from soma_lightning.components import register

        return register
    if name == "load":  # soma_lightning/loading.py, which imports Lightning
        from soma_lightning.loading import load

        return load
    raise AttributeError(f"module 'soma_lightning' has no attribute {name!r}")
