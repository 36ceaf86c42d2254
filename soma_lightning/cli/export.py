"""`soma-lightning export`: one safetensors file, a transformers directory or an ONNX file, from a checkpoint."""

from json import dumps
from pathlib import Path
from typing import Literal

from soma_lightning.callbacks.safetensors_export import full_state, is_v1, write_safetensors
from soma_lightning.checkpoint_io import describe_write_error
from soma_lightning.checkpoints import load_module, resolve_checkpoint
from soma_lightning.errors import UserError
from soma_lightning.hf_format import is_transformers_dir, load_transformers, save_transformers
from soma_lightning.measure import count_parameters
from soma_lightning.quantize import Mode, save_quantized
from soma_lightning.quantize import quantize as quantize_weights
from soma_lightning.v1 import WeightsError, model_size, size_mismatch

Layout = Literal["auto", "canonical", "state_dict", "hf"]
Format = Literal["safetensors", "onnx"]


def export_checkpoint(
    ckpt: str, out: str, which: str = "best", layout: Layout = "auto", strict_v1: bool = False, format: Format = "safetensors", quantize: Mode | None = None
) -> dict:
    """Write a run's weights as one safetensors file (a transformers directory for layout hf, an ONNX file for
    format onnx) and say what was written (see `export`)."""
    if strict_v1 and layout == "state_dict":
        raise UserError("--strict_v1: checks the canonical V1 layout, but --layout is state_dict")
    if format == "onnx" and (layout != "auto" or strict_v1):
        raise UserError(f"--format onnx: writes one .onnx file; {'--strict_v1' if strict_v1 else '--layout ' + layout} applies to --format safetensors")
    if quantize is not None and format == "onnx":
        raise UserError("--quantize: applies to --format safetensors; --format onnx exports the float32 model")
    if quantize is not None and (layout in ("canonical", "hf") or strict_v1):
        what = "--strict_v1 checks the canonical V1 layout" if strict_v1 else f"--layout {layout}"
        raise UserError(f"--quantize: writes the state_dict layout (integer codes and scales, docs/after_training.md); {what} holds float weights only")
    target = Path(out)
    if layout == "hf" and target.is_file():
        raise UserError(f"--out: {out} is a file; --layout hf writes a directory (config.json and model.safetensors)")
    if layout != "hf" and target.is_dir():
        raise UserError(f"--out: {out} is a directory; expected the path of the .{format} file to write")
    path = Path(ckpt) if is_transformers_dir(ckpt) else resolve_checkpoint(ckpt, which)
    # Of a run directory, every checkpoint is kept safe: exporting best over last.ckpt would lose last.ckpt.
    run_checkpoints = list(path.parent.glob("*.ckpt")) if Path(ckpt).is_dir() and path != Path(ckpt) else []
    for checkpoint in [path, *run_checkpoints]:
        inside = checkpoint.is_dir() and target.resolve().is_relative_to(checkpoint.resolve())
        if inside or target.resolve() == checkpoint.resolve() or (target.exists() and target.samefile(checkpoint)):
            where = f"is inside the checkpoint folder {checkpoint}" if inside else f"is the checkpoint {checkpoint}"
            raise UserError(f"--out: {out} {where} of --ckpt {ckpt}; writing there would destroy it, pick another path")
    module = load_transformers(path) if is_transformers_dir(path) else load_module(path)
    if strict_v1:
        try:
            mismatch = size_mismatch(model_size(module.model))
        except WeightsError as e:
            raise UserError(f"--strict_v1: {path}: {e}") from None
        if mismatch:
            raise UserError(f"--strict_v1: {path} is {mismatch}")
    if quantize is not None:
        quantize_weights(module.model, quantize)
    float_file = format == "safetensors" and quantize is None and layout != "hf"
    canonical = float_file and (strict_v1 or layout == "canonical" or (layout == "auto" and is_v1(module.model)))
    parameters = count_parameters(module.model)[0]
    existed = target.exists()
    try:
        if format == "onnx":
            from soma_lightning.onnx_export import export_onnx

            return {"ckpt": str(path), "out": out, "format": "onnx", **export_onnx(module.model, target, module.arch.max_seq_len), "parameters": parameters}
        if quantize is not None:
            keys = save_quantized(module.model, module.arch, target)
        elif layout == "hf":
            keys = save_transformers(module.model, target, module.vocabulary, module.arch.max_seq_len)
        else:
            tensors = full_state(module.model)
            write_safetensors(module.model, tensors, module.arch, out, canonical)
            keys = len(tensors)
    except Exception as e:
        if (reason := describe_write_error(out, e)) is None:
            raise
        raise UserError(f"--out: {reason}; " + ("the previous file is unchanged" if existed else "nothing was written")) from None
    written = "hf" if layout == "hf" else "canonical" if canonical else "state_dict"
    quantized = {} if quantize is None else {"quantize": quantize}
    return {"ckpt": str(path), "out": out, "layout": written, **quantized, "keys": keys, "parameters": parameters}


def export(
    ckpt: str,
    out: str,
    which: Literal["best", "last"] = "best",
    layout: Layout = "auto",
    strict_v1: bool = False,
    format: Format = "safetensors",
    quantize: Mode | None = None,
) -> None:
    """Write a run's weights as one safetensors file, as a Hugging Face transformers directory, or as an ONNX
    file: a .ckpt, or a sharded checkpoint folder (FSDP2, FSDP1 or DeepSpeed ZeRO) consolidated. Prints what
    was written as JSON.

    Args:
        ckpt: a .ckpt file, a sharded checkpoint folder, a run directory (runs/NAME/version_N), or a
            transformers GPT-NeoX directory of a V1-shaped model (config.json + model.safetensors)
        out: the .safetensors file to write (for --layout hf: the directory; for --format onnx: the .onnx file)
        which: which checkpoint of a run directory
        layout: canonical (SOMA V1's layout, 389 keys for the full model, F32), state_dict (the model's own
            tensors with the resolved spec in the metadata), auto (canonical for a V1-shaped model), hf (a
            V1-shaped model as a transformers GPT-NeoX directory, config.json + model.safetensors, which
            GPTNeoXForCausalLM.from_pretrained loads; a non-zero predictor bias is refused, see hf_format.py)
        strict_v1: refuse a model that is not the registered V1 size (d_model 2048, 24 layers, 8 heads,
            hidden 8192), the only one the network loads
        format: safetensors (the layouts above), or onnx: a V1-shaped model as one ONNX file in float32, input
            `tokens` int64 [batch, sequence], output `logits`, both axes dynamic (soma_lightning/onnx_export.py);
            prints ONNX Runtime's largest logit difference on a sample when onnxruntime is installed
        quantize: int8 or int4: weight-only quantization of every Linear layer (soma_lightning/quantize.py),
            written as the state_dict layout with integer codes and scales, which soma_lightning.load reads back
    """
    print(dumps(export_checkpoint(ckpt, out, which, layout, strict_v1, format, quantize)))
