"""The kill test (reliability issue): SIGKILL real training subprocesses, including during
checkpoint writes, resume each time, and demand bitwise-identical losses and adapter."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "kill_resume.py"


def test_sigkill_and_resume_equals_uninterrupted(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("kill_resume", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    # 24 steps: each kill lands within a few steps of a new checkpoint (in the run's own step time), so
    # the third lands before the run ends however fast a step is
    rc = mod.main(["--kills", "3", "--steps", "24", "--seed", "1", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert '"same_losses": true' in out and '"same_adapter": true' in out
    assert "during a checkpoint write" in out
    assert '"resumes": 3' in out
