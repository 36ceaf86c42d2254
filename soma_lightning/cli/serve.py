"""`soma-lightning serve`: an HTTP server with an OpenAI-compatible /v1/completions (docs/serving.md)."""

from typing import Literal

from soma_lightning.errors import UserError
from soma_lightning.loading import load
from soma_lightning.quantize import Mode
from soma_lightning.quantize import quantize as quantize_weights
from soma_lightning.v1 import check_device


def serve(
    ckpt: str,
    which: Literal["best", "last"] = "last",
    tokenizer: str | None = None,
    device: str = "cpu",
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 32,
    max_cohorts: int = 2,
    quantize: Mode | None = None,
) -> None:
    """Serve a trained model over HTTP: an OpenAI-compatible POST /v1/completions (streaming as
    server-sent events) with generate's constraints and traces, concurrent requests decoded in shared
    batches; GET /v1/models and /health. Runs until interrupted.

    Args:
        ckpt: a .ckpt file, a run directory (runs/NAME/version_N), an exported .safetensors file or a
            transformers directory
        which: which checkpoint of a run directory
        tokenizer: the model's tokenizer file, when it moved since training
        device: cpu, cuda or cuda:N
        host: the address to listen on (127.0.0.1: this machine only)
        port: the TCP port
        max_batch: requests decoded at once at most; more wait for a free slot
        max_cohorts: batches decoded side by side at most: requests arriving while this many run wait
            for one to end and then start together (fewer, larger batches: more throughput, more latency)
        quantize: int8 or int4: weight-only quantization of every Linear layer through torchao, on the device
            (soma_lightning/quantize.py)
    """
    try:
        import uvicorn

        from soma_lightning.serving.app import create_app
    except ImportError as e:
        raise UserError(f"serve: needs FastAPI and uvicorn ({e}); pip install 'soma-lightning[serve]'") from None
    check_device(device)
    if max_batch < 1 or max_cohorts < 1:
        raise UserError(f"--max_batch, --max_cohorts: must be at least 1, got {max_batch}, {max_cohorts}")
    if not 0 <= port <= 65535:
        raise UserError(f"--port: expected 0..65535, got {port}")
    from soma_lightning.serving.engine import Engine

    module = load(ckpt, which, device, tokenizer)
    if quantize is not None:
        quantize_weights(module.model, quantize)
    uvicorn.run(create_app(Engine(module, device, max_batch, max_cohorts), ckpt), host=host, port=port, log_level="info")
