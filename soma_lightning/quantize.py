"""Weight-only int8 and int4 quantization for inference through torchao (`--quantize`, the `quantize` extra).

Every nn.Linear of any architecture (attention and FFN projections, MoE routers, the predictor, the Linear
layers of SOSM's embedding and of MTP heads) gets an integer weight; activations stay in the model's dtype and
each matmul dequantizes the weight on the fly. Embedding tables, norms, biases, MoE experts (3-D parameters,
not Linear layers) and Gated DeltaNet's convolution keep their dtype.

* int8: torchao's Int8WeightOnlyConfig, symmetric, one scale per output row: w = q * scale[row].
* int4: torchao's IntxWeightOnlyConfig(int4), symmetric, one scale per GROUP_SIZE inputs of a row:
  w = q * scale[row, col // GROUP_SIZE], q in [-8, 7]. Linear layers whose in_features GROUP_SIZE does not
  divide keep their dtype (`skipped`). torchao 0.18's Int4WeightOnlyConfig runs on no CPU (its packings
  need CUDA and bfloat16 (tile_packed_to_4d, which also pads in_features to 1024), the separate mslk
  kernels (plain, preshuffled), or XPU/NPU (plain_int32)), so int4 uses the device-agnostic
  IntxWeightOnlyConfig on CPU and CUDA alike. It holds one code per byte in memory (int4's accuracy at a
  little more than int8's memory, the per-group scales and zero points added); the export file packs two
  codes per byte.

GROUP_SIZE is 32: the finest group of the sizes torchao's int4 kernels take (32 to 256), so the most
accurate, and it divides the width of every Linear layer of the shipped specs (32 and up).

The export form (`quantized_state`, read back by `load_quantized`): a safetensors file of the model's state
dict in which the weight `K` of each quantized Linear is replaced by two tensors, `K.qdata` and `K.scale`;
its metadata holds QUANTIZATION_KEY = {"mode", "group_size", "dtype", "layers": [K, ...]}. int8 qdata is
int8 [out, in] and scale [out, 1]; int4 qdata is uint8 [out, in / 2], two codes a byte, code + 8 (0..15),
the even column in the low nibble, and scale [out, in / GROUP_SIZE]. No zero points (symmetric). Anyone can
dequantize it with the formulas above; nothing in it is pickled.
"""

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Literal, get_args

import torch
from torch import Tensor, nn

from soma_lightning.errors import UserError

if TYPE_CHECKING:
    from soma_lightning.spec import ModelSpec

Mode = Literal["int8", "int4"]
GROUP_SIZE = 32
QUANTIZATION_KEY = "soma_lightning_quantization"
DEVICES = ("cpu", "cuda")


@contextmanager
def _quiet_import() -> Iterator[None]:
    """torchao's import logs a warning for each CUDA-only extension it cannot load, and torch one for an enum
    torchao registers; neither concerns the weight-only path."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def require_torchao(flag: str = "--quantize") -> None:
    try:
        with _quiet_import():
            import torchao.quantization  # noqa: F401
    except ImportError as e:
        raise UserError(f"{flag}: needs torchao ({e}); pip install 'soma-lightning[quantize]'") from None


def _check_mode(mode: str, flag: str) -> None:
    if mode not in get_args(Mode):
        raise UserError(f"{flag}: expected one of {', '.join(get_args(Mode))}, got {mode!r}")


def _eligible(module: nn.Module, mode: Mode) -> bool:
    return isinstance(module, nn.Linear) and (mode == "int8" or module.in_features % GROUP_SIZE == 0)


def skipped(model: nn.Module, mode: Mode) -> list[str]:
    """The Linear layers `quantize(model, mode)` leaves in their dtype (int4: in_features not a multiple of
    GROUP_SIZE)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not _eligible(m, mode)]


def _is_quantized(weight: Tensor) -> bool:
    return type(weight) not in (Tensor, nn.Parameter)


def _config(mode: Mode):
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    if mode == "int8":  # without torchao's global torch._inductor settings, which would outlive the call
        return Int8WeightOnlyConfig(set_inductor_config=False)
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(GROUP_SIZE))


def quantize(model: nn.Module, mode: Mode, flag: str = "--quantize") -> nn.Module:
    """Quantize the weights of the model's Linear layers to `mode` in place (see the module's docstring) and
    return the model. Quantize after moving the model to its device and dtype. A UserError (one line naming
    `flag`) when torchao is missing, the model is on a device other than cpu or cuda, or already quantized."""
    _check_mode(mode, flag)
    require_torchao(flag)
    devices = sorted({p.device.type for p in model.parameters()})
    if not set(devices) <= set(DEVICES):
        raise UserError(f"{flag} {mode}: torchao's weight-only kernels run on {' and '.join(DEVICES)}; the model is on {', '.join(devices)}")
    if any(isinstance(m, nn.Linear) and _is_quantized(m.weight) for m in model.modules()):
        raise UserError(f"{flag} {mode}: the model's weights are quantized already")
    from torchao.quantization import quantize_

    with _quiet_import():
        quantize_(model, _config(mode), filter_fn=lambda module, fqn: _eligible(module, mode))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes the model's parameters and buffers hold in memory; a quantized weight counts its codes, scales
    and zero points."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if _is_quantized(tensor):
            names, _ = tensor.__tensor_flatten__()
            total += sum(getattr(tensor, name).nbytes for name in names)
        else:
            total += tensor.nbytes
    return total


def _pack_int4(codes: Tensor) -> Tensor:
    biased = (codes.to(torch.int16) + 8).to(torch.uint8)
    return biased[:, 0::2] | (biased[:, 1::2] << 4)


def _unpack_int4(packed: Tensor) -> Tensor:
    low, high = (packed & 0x0F).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).flatten(-2)


def quantized_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The export form of a quantized model (module docstring): contiguous CPU tensors and the metadata entry."""
    modules = dict(model.named_modules())
    layers = [f"{name}.weight" for name, m in modules.items() if isinstance(m, nn.Linear) and _is_quantized(m.weight)]
    if not layers:
        raise UserError("--quantize: the model has no quantized Linear layer")
    first = modules[layers[0].removesuffix(".weight")].weight
    mode: Mode = "int4" if getattr(first, "target_dtype", None) == torch.int4 else "int8"
    tensors = {}
    for key, value in model.state_dict().items():
        if key not in layers:
            tensors[key] = value.detach().to("cpu").contiguous()
            continue
        if torch.any(value.zero_point != 0):
            raise ValueError(f"{key}: expected a symmetric quantization (zero points 0)")
        codes = value.qdata.to("cpu")
        tensors[f"{key}.qdata"] = (_pack_int4(codes) if mode == "int4" else codes).contiguous()
        tensors[f"{key}.scale"] = value.scale.detach().to("cpu").contiguous()
    description = {"mode": mode, "group_size": GROUP_SIZE if mode == "int4" else None, "dtype": str(first.dtype).removeprefix("torch."), "layers": layers}
    return tensors, {QUANTIZATION_KEY: json.dumps(description)}


def save_quantized(model: nn.Module, arch: "ModelSpec", path: str | os.PathLike) -> int:
    """Write the export form of a quantized model, with the resolved spec under the state_dict layout's key,
    atomically; returns the number of tensors written."""
    from safetensors.torch import save_file

    from soma_lightning.callbacks.safetensors_export import SPEC_KEY
    from soma_lightning.checkpoint_io import atomic_write, ordinary_mode

    tensors, metadata = quantized_state(model)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata | {SPEC_KEY: json.dumps(asdict(arch))})
        ordinary_mode(tmp)

    atomic_write(Path(path), write)
    return len(tensors)


def _weight(mode: Mode, qdata: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """The torchao tensor `quantize` would have made, from the codes and scales of the export form."""
    if mode == "int8":
        from torchao.quantization import Int8Tensor

        zero_point = torch.zeros(scale.shape, dtype=torch.int8)
        return Int8Tensor(qdata, scale, [1, qdata.shape[1]], dtype, zero_point=zero_point)
    from torchao.quantization import IntxUnpackedToInt8Tensor

    codes = _unpack_int4(qdata)
    zero_point = torch.zeros(scale.shape, dtype=torch.int8)
    return IntxUnpackedToInt8Tensor(codes, scale, zero_point, torch.int4, (1, GROUP_SIZE), dtype, None)


def load_quantized(model: nn.Module, tensors: dict[str, Tensor], description: str, where: str) -> None:
    """Load the export form (`quantized_state`) into a freshly built float model, in place: its quantized
    Linear layers get the torchao tensors that were exported, the rest the file's tensors."""
    require_torchao(where)
    try:
        info = json.loads(description)
        mode, layers, dtype = info["mode"], list(info["layers"]), getattr(torch, info["dtype"])
        if mode not in get_args(Mode) or (mode == "int4" and info["group_size"] != GROUP_SIZE) or not isinstance(dtype, torch.dtype):
            raise ValueError(f"mode {mode!r}, group size {info.get('group_size')!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{where}: unreadable {QUANTIZATION_KEY} metadata ({e})") from None
    model.to(dtype)
    plain = {key: value for key, value in tensors.items() if not key.endswith((".qdata", ".scale"))}
    modules = dict(model.named_modules())
    try:
        quantized = {key: _weight(mode, tensors[f"{key}.qdata"], tensors[f"{key}.scale"], dtype) for key in layers}
        for key, weight in quantized.items():
            module = modules.get(key.removesuffix(".weight"))
            if not isinstance(module, nn.Linear) or weight.shape != module.weight.shape:
                raise ValueError(f"{key} is not a Linear weight of shape {tuple(weight.shape)} in the spec")
            module.weight = nn.Parameter(weight, requires_grad=False)
        missing, unexpected = model.load_state_dict(plain, strict=False)
    except (KeyError, ValueError, RuntimeError, AssertionError) as e:
        raise UserError(f"{where}: does not match the spec in its metadata ({' '.join(str(e).split())[:300]})") from None
    missing = [key for key in missing if key not in quantized]
    if missing or unexpected:
        raise UserError(f"{where}: does not match the spec in its metadata (missing {missing[:3]}, unexpected {unexpected[:3]})")
