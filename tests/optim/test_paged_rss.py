"""A run whose optimizer state is larger than its RAM budget finishes under that budget (peak RSS
of a child process), while the same run unpaged holds the whole state."""

import json
import subprocess
import sys

import pytest

LAYERS, DIM = 16, 1024  # 16 x 1024 x 1024 fp32 params: 134 MB of AdamW state (8 bytes/param)
STATE = LAYERS * DIM * DIM * 8
BUDGET = 32 * 2**20
MARGIN = 40 * 2**20  # one parameter's temporaries (sqrt(v): 4 MB), allocator slack, thread stacks

CHILD = f"""
import json, sys, torch
from qlora.optim import build_optimizer
kind, budget, offload = sys.argv[1], int(sys.argv[2]) or None, sys.argv[3]
params = [(f"l{{i}}.weight", torch.nn.Parameter(torch.zeros({DIM}, {DIM}))) for i in range({LAYERS})]
gen = torch.Generator().manual_seed(0)
for _, p in params:
    p.grad = torch.zeros_like(p)
    p.grad.normal_(generator=gen)
def status(key):  # /proc/self/status values are KiB; VmHWM is per address space (reset by exec,
    # unlike ru_maxrss, which carries over the forking parent's peak)
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key + ":"))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
base = status("VmRSS")
opt = build_optimizer(params, kind, lr=1e-3, memory_budget=budget, offload_dir=offload)
for _ in range(2):  # step 1 pages everything out, step 2 back in and out again
    opt.step()
peak = status("VmHWM")
print(json.dumps({{"base": base, "peak": peak, "stats": opt.stats()}}))
opt.close()
"""


def _start(kind, budget, tmp_path):
    return subprocess.Popen([sys.executable, "-c", CHILD, kind, str(budget), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc):
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss units are KiB on Linux only")
def test_paged_run_stays_under_budget_while_unpaged_holds_the_state(tmp_path):
    procs = _start("paged_adamw", BUDGET, tmp_path), _start("adamw", 0, tmp_path)  # in parallel
    paged, unpaged = map(_result, procs)
    assert paged["stats"]["paged"] and paged["stats"]["bytes_out"] > 1.5 * STATE
    assert paged["peak"] - paged["base"] < BUDGET + MARGIN, paged
    assert unpaged["peak"] - unpaged["base"] > STATE - MARGIN, unpaged
