"""The built-in demo's run wrapper: nothing is written before the run is validated."""

from __future__ import annotations

import pytest

from qlora.demo import run_demo
from qlora.errors import QloraError


def test_failed_demo_run_leaves_nothing_behind(tiny_llama, tmp_path):
    out = tmp_path / "runs" / "demo"
    with pytest.raises(QloraError, match="no checkpoint to resume from"):
        run_demo({"model": tiny_llama, "output_dir": str(out), "resume": "latest"})
    assert not (tmp_path / "runs").exists()  # no demo_data, no output directory
