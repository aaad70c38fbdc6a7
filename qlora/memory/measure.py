"""Measured peaks to hold the estimator to: a command's peak RSS, and the exact peak of live
tensor bytes inside a block of code (CPU has no allocator statistics, so we count storages)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import weakref


# Runs the command from a fresh, small interpreter. A child's peak RSS starts at what its parent
# held when it forked (the copied address space counts until exec), so forking the command straight
# from a process that has torch loaded would report at least that; from this launcher, ~10 MiB.
_LAUNCHER = """
import os, sys
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def measure_peak_rss(cmd: list[str], env: dict | None = None, timeout: float | None = None) -> int:
    """Peak resident set size in bytes of `cmd` run to completion (the largest of it and its
    waited-for children, as getrusage reports). Raises RuntimeError if the command fails."""
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = os.path.join(tmp, "maxrss")
        launcher = [sys.executable, "-S", "-c", _LAUNCHER, peak_file, *map(str, cmd)]
        proc = subprocess.run(launcher, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, timeout=timeout)
        if proc.returncode != 0:
            tail = proc.stdout[-2000:].decode("utf-8", "replace")
            raise RuntimeError(f"{' '.join(map(str, cmd))} exited with {proc.returncode}:\n{tail}")
        with open(peak_file) as f:
            return int(f.read()) * 1024  # Linux reports KiB


class TensorPeak:
    """`with TensorPeak(ignore=model.parameters()) as p: ...` -> p.peak, p.current: bytes of
    tensor storages created inside the block and still alive, at most / at the end. Storages of
    `ignore` (weights, buffers) are skipped: views of them are not new memory."""

    def __init__(self, ignore=()):
        from torch.utils._python_dispatch import TorchDispatchMode

        self.ignore = {t.untyped_storage().data_ptr() for t in ignore}
        self.current = self.peak = 0
        self._live: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}
        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._track(out)
                return out

        self._mode = _Mode()

    def _track(self, out) -> None:
        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key, n = st.data_ptr(), st.nbytes()
            if n == 0 or key in self._live or key in self.ignore:
                continue
            self._live[key] = n
            self.current += n
            self.peak = max(self.peak, self.current)
            self._refs[key] = weakref.ref(st, lambda _, key=key: self._free(key))

    def _free(self, key: int) -> None:
        n = self._live.pop(key, None)
        self._refs.pop(key, None)
        if n is not None:
            self.current -= n

    def __enter__(self) -> "TensorPeak":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
