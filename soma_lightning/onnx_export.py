"""ONNX export of V1-shaped models (`soma-lightning export --format onnx`, the `onnx` extra).

torch.onnx's dynamo exporter (torch.export, then onnxscript's op library) traces the model in float32 and
eval mode: one input `tokens` (int64 [batch, sequence]), one output `logits` (float32 [batch, sequence,
vocab]), both axes dynamic, the sequence traced up to the model's max_seq_len, its context (nothing in
the file checks the length). A model of 2 GB of weights or
more keeps them in `<file>.data` beside the file (protobuf's size limit); ONNX Runtime finds it there.

Only V1-shaped models (`callbacks.safetensors_export.is_v1`: embedding, pre-norm LayerNorm blocks of
multi-head attention and a GELU MLP, final LayerNorm, predictor) are exported: those are the graphs the
parity test covers."""

import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from soma_lightning.checkpoint_io import atomic_write
from soma_lightning.errors import UserError
from soma_lightning.v1 import WeightsError, canonical_state_dict, v1_shape_problem

INPUT, OUTPUT = "tokens", "logits"
FLAG = "--format onnx"
_PROTOBUF_LIMIT = 2 * 1024**3


def _require(modules: str, flag: str) -> None:
    try:
        for module in modules.split():
            __import__(module)
    except ImportError as e:
        raise UserError(f"{flag}: needs {' and '.join(modules.split())} ({e}); pip install 'soma-lightning[onnx]'") from None


def onnx_refusal(model: nn.Module) -> str | None:
    """Why the model is not exported to ONNX (it is not V1-shaped), in words; None when it is."""
    if problem := v1_shape_problem(model):
        return problem
    try:
        canonical_state_dict(model)
    except WeightsError as e:
        return str(e)
    return None


def export_onnx(model: nn.Module, path: str | Path, max_seq_len: int, external_data: bool | None = None) -> dict:
    """Write the V1-shaped `model` (cast to float32 and put in eval mode, in place) as an ONNX file at `path`,
    atomically; `external_data`: the weights in `<path>.data` (default: when they reach 2 GB). Returns the
    opset and the largest |logit difference| of ONNX Runtime against the model on a sample, when
    onnxruntime is installed."""
    if problem := onnx_refusal(model):
        raise UserError(f"{FLAG}: exports V1-shaped models only; {problem}; use --format safetensors")
    _require("onnx onnxscript", FLAG)
    import onnx

    path = Path(path)
    model.float().eval()
    sample = torch.randint(0, model.predictor.out_features, (2, min(16, max_seq_len)), generator=torch.Generator().manual_seed(0))
    dynamic = ({0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", max=max_seq_len)},)
    exporter = logging.getLogger("torch.onnx")
    level = exporter.level
    exporter.setLevel(logging.ERROR)  # one warning per torchvision op it cannot register
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(model, (sample,), dynamo=True, input_names=[INPUT], output_names=[OUTPUT], dynamic_shapes=dynamic, verbose=False)
    finally:
        exporter.setLevel(level)
    proto = program.model_proto
    if external_data is None:
        external_data = sum(p.nbytes for p in model.parameters()) >= _PROTOBUF_LIMIT

    def write(tmp: Path) -> None:
        onnx.save_model(proto, str(tmp), save_as_external_data=external_data, all_tensors_to_one_file=True, location=f"{path.name}.data")

    atomic_write(path, write)
    result = {"opset": next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), "external_data": external_data}
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return result
    return result | {"onnxruntime_max_abs_diff": max_abs_diff(path, model, sample)}


def onnx_logits(path: str | Path, tokens: Tensor) -> np.ndarray:
    """The logits ONNX Runtime (CPU) computes from the exported file for int64 token ids [batch, sequence]."""
    _require("onnxruntime", "onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {INPUT: tokens.to(torch.int64).numpy()})[0]


@torch.no_grad()
def max_abs_diff(path: str | Path, model: nn.Module, tokens: Tensor) -> float:
    """Largest |ONNX Runtime's logits - the model's| on `tokens`, in float32."""
    return float(np.abs(onnx_logits(path, tokens) - model.float().eval()(tokens).numpy()).max())
