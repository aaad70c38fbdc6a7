"""Known, harmless messages of packages qlora does not use, dropped before the user sees them.

With torchao installed, transformers imports it while loading a model; torchao then registers its
enums with torch's pytree (torch >= 2.10 logs a deprecation for each, through the logger
torch.utils._pytree) and tries its optional compiled CUDA/MXFP8 extensions (logging each one it
cannot load, through the logger torchao). Each filter matches exactly those records; anything else
from the same loggers passes.
"""

from __future__ import annotations

import enum
import logging


def _torchao_enum_registered(record: logging.LogRecord) -> bool:
    cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
    return ("is an Enum subclass" in str(record.msg) and isinstance(cls, type) and issubclass(cls, enum.Enum)
            and cls.__module__.split(".")[0] == "torchao")


def _torchao_extension_missing(record: logging.LogRecord) -> bool:
    msg = str(record.msg)
    return msg.startswith("Failed to load ") and "/torchao/_C" in msg


_FILTERS = {"torch.utils._pytree": _torchao_enum_registered, "torchao": _torchao_extension_missing}


class _Drop(logging.Filter):
    def __init__(self, matches):
        super().__init__()
        self.matches = matches

    def filter(self, record: logging.LogRecord) -> bool:  # False: the record is dropped
        return not self.matches(record)


def silence_known_noise() -> None:
    """Install the filters (once per logger, however often this is called)."""
    for name, matches in _FILTERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(matches))
