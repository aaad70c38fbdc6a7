"""`qlora serve`: an OpenAI-compatible HTTP API (/v1/models, /v1/chat/completions, /v1/completions)."""

from .protocol import ApiError
from .server import App, make_server, serve

__all__ = ["ApiError", "App", "make_server", "serve"]
