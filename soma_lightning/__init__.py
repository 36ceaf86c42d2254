"""soma-lightning: declarative SOMA-family language models on PyTorch Lightning."""

from soma_lightning.spec import ModelSpec, SpecError, build_model, load_spec, register

__all__ = ["ModelSpec", "SpecError", "build_model", "load_spec", "register"]
