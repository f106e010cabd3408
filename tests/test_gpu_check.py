"""bench/gpu_check.py --dry-run: the plan of the first GPU run's checks, exit status 0 (without CUDA it says
it needs CUDA and runs nothing)."""

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_prints_the_plan_and_exits_0():
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "gpu_check plan (5 checks, at most 10 minutes):"
    assert [line.split(":")[0].strip() for line in lines[1:6]] == [
        "nvml-power-energy", "pytest-gpu", "fused-vs-peft-bf16", "kill-resume-cuda", "qlora-eval-budget"]
    if torch.cuda.is_available():
        assert lines[6].startswith("gpu_check: --dry-run on ")
    else:
        assert lines[6].startswith("gpu_check: needs CUDA; torch ") and lines[6].endswith("so nothing was run")
    assert not any(line.startswith(("PASS", "FAIL")) for line in lines)
