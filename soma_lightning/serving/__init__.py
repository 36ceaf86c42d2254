"""`soma-lightning serve`: an OpenAI-compatible completions server for every architecture.

- engine.py: the worker thread that owns the model and decodes the requests in flight in batches of
  different prompt lengths (no web dependencies);
- app.py: the FastAPI application, request validation and server-sent events (the `serve` extra).
"""

from soma_lightning.serving.engine import Completion, Engine, Event

__all__ = ["Completion", "Engine", "Event"]
