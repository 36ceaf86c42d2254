"""`soma_lightning.load`: a trained model from what training and `export` leave on disk, weights only."""

import json
import os
from pathlib import Path
from typing import Literal

from soma_lightning.errors import UserError
from soma_lightning.hf_format import is_transformers_dir, load_transformers
from soma_lightning.lm import SomaLM


def load(path: str | os.PathLike, which: Literal["best", "last"] = "last", device: str = "cpu", tokenizer: str | os.PathLike | None = None) -> SomaLM:
    """The SomaLM of a run, a checkpoint or an exported file, in eval mode on `device`; nothing in the files
    is executed (weights-only loading).

    `path` may be:
      * a Lightning `.ckpt` file, or a sharded checkpoint folder (FSDP2, FSDP1 or DeepSpeed ZeRO, consolidated
        in this process): the module as trained, with its spec, objective and optimizer settings;
      * a run directory (runs/NAME/version_N, or its checkpoints/ folder): its `which` checkpoint, `last`
        (last.ckpt) or `best` (the newest best-*.ckpt);
      * a transformers GPT-NeoX directory (`export --layout hf`, or a V1-shaped model from elsewhere; weights
        from safetensors only): the V1 model it holds (soma_lightning/hf_format.py);
      * a `.safetensors` file written by `soma-lightning export` or the SafetensorsExport callback:
        - state_dict layout: the model its metadata's spec describes, holding the file's tensors;
        - canonical V1 layout (also files from elsewhere, e.g. soma-models' `Model.save`): a V1 model of the
          file's size, the head count from the metadata (else 8, V1's), the spec from the metadata when the
          export recorded one. For the on-chain loss use `soma_lightning.v1.model_from_canonical` and
          `onchain.score`, whose reference attention is the scorer's arithmetic bitwise.
        Exported files carry no optimizer settings: the module has SomaLM's defaults.

    `tokenizer`: the model's tokenizer file, when it moved since training (it replaces the path in the spec);
    a checkpoint refuses a file other than the one it was trained with (by SHA-256), as one line.

    Use `module.model` for the bare network (`module.model(tokens)` gives logits) and
    `soma_lightning.generation.generate(module.model, ...)` to sample. A path that is none of these is a
    UserError (one line naming it)."""
    from soma_lightning.v1 import check_device

    target = check_device(device, "device")
    p = Path(path)
    if p.suffix == ".safetensors" and p.is_file():
        module = _load_safetensors(p, tokenizer)
    elif is_transformers_dir(p):
        module = load_transformers(p, tokenizer)
    else:
        from soma_lightning.checkpoints import load_module

        module = load_module(path, which, "path", tokenizer)
    return module.to(target).eval()


def _spec(metadata: str, tokenizer: str | os.PathLike | None):
    """The spec an export's metadata records, with the tokenizer file at `tokenizer` when given."""
    from soma_lightning.spec import spec_from_dict

    arch = json.loads(metadata)
    return spec_from_dict(arch if tokenizer is None else arch | {"tokenizer": str(tokenizer)})


def _load_safetensors(path: Path, tokenizer: str | os.PathLike | None) -> SomaLM:
    from safetensors.torch import load_file

    from soma_lightning.callbacks.safetensors_export import CANONICAL_SPEC_KEY, SPEC_KEY
    from soma_lightning.quantize import QUANTIZATION_KEY, load_quantized
    from soma_lightning.v1 import dims_of, file_metadata, file_shapes, load_canonical, read_canonical, resolve_num_heads, v1_spec

    metadata = file_metadata(path)
    if SPEC_KEY in metadata:
        tensors = load_file(path)
        module = SomaLM(_spec(metadata[SPEC_KEY], tokenizer))
        if QUANTIZATION_KEY in metadata:  # `export --quantize`: the torchao weights, soma_lightning/quantize.py
            load_quantized(module.model, tensors, metadata[QUANTIZATION_KEY], f"path: {path}")
            return module
        try:
            module.model.load_state_dict(tensors)
        except RuntimeError as e:
            raise UserError(f"path: {path} does not match the spec in its metadata ({' '.join(str(e).split())[:300]})") from None
        return module
    try:
        dims = dims_of(file_shapes(path), str(path))
    except UserError as e:
        raise UserError(f"path: {e}, nor a soma-lightning state_dict export (no {SPEC_KEY} in its metadata)") from None
    if CANONICAL_SPEC_KEY in metadata:
        spec = _spec(metadata[CANONICAL_SPEC_KEY], tokenizer)
    else:
        d_model, n_layers, hidden_dim, vocab_size = dims
        spec = v1_spec(d_model, n_layers, hidden_dim, resolve_num_heads(path, None, "num_heads"), vocab_size)
    module = SomaLM(spec)
    load_canonical(module.model, read_canonical(path), str(path))
    return module
