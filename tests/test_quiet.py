"""qlora/quiet.py: torchao's import-time messages (its enums registered with torch's pytree, its
optional CUDA extensions that cannot load) do not reach a qlora user; other records still do."""

from __future__ import annotations

import enum
import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qlora  # noqa: F401  (installs the filters)

ROOT = Path(__file__).resolve().parents[1]


# Counts what reaches the two loggers (a filter added before qlora's sees every record), then imports
# torchao after qlora: stderr must hold none of it.
_CHILD = """
import logging, sys
seen = []
for name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(name).addFilter(lambda r: seen.append(r.getMessage()) or True)
import qlora, torchao
print(len(seen))
"""


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_importing_torchao_after_qlora_prints_none_of_its_noise():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    if int(proc.stdout) == 0:
        pytest.skip("this torch/torchao pair logs nothing on import")
    assert [line for line in proc.stderr.splitlines() if "torchao" in line or "Enum subclass" in line] == []


def _reaches_root(logger: logging.Logger) -> bool:
    """False for torch's loggers: "torch" stops propagation once torch has configured its logging."""
    while logger.parent is not None:
        if not logger.propagate:
            return False
        logger = logger.parent
    return True


class Mode(enum.Enum):
    A = 1


def test_other_records_of_the_same_loggers_pass(caplog):
    msg = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."
    torchao_enum = enum.Enum("KernelPreference", "AUTO")
    torchao_enum.__module__ = "torchao.quantization.quantize_.common.kernel_preference"
    pytree, torchao = logging.getLogger("torch.utils._pytree"), logging.getLogger("torchao")
    listen = [lg for lg in (pytree, torchao) if not _reaches_root(lg)]  # caplog listens at the root
    for logger in listen:
        logger.addHandler(caplog.handler)
    try:
        pytree.warning(msg, torchao_enum)  # dropped
        pytree.warning(msg, Mode)  # not torchao's: kept
        torchao.warning("Failed to load /x/site-packages/torchao/_C_mxfp8.so: missing")  # dropped
        torchao.warning("Failed to load the config")  # kept
        pytree.warning("something else")  # kept
    finally:
        for logger in listen:
            logger.removeHandler(caplog.handler)
    assert [r.getMessage() for r in caplog.records] == [msg % Mode, "Failed to load the config", "something else"]
