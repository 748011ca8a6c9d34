"""``make gpu-check`` (tools/gpu_check.sh, issue 18 section 5) stays working without a GPU: its
``--dry-run`` mode runs every step it can here (the build check, the emulator and no-host-read tests
on SIMT, two quick CPU benchmark cases) and prints the one table the real run prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_prints_its_table():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    result = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", sys.executable],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()[3:] if line.strip()}
    assert rows == {"build": "pass", "tests": "pass", "sanitizer": "skipped", "bench": "pass"}, result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the real run is `make gpu-check` itself")
def test_gpu_check_without_a_gpu_refuses_the_real_run():
    result = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), sys.executable], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "no CUDA device" in result.stderr
