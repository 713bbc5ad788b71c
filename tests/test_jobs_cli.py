"""Every entry point under jobs/ answers --help (it parses before importing torch or Ray)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

JOBS = sorted((Path(__file__).resolve().parent.parent / "jobs").glob("*.py"))


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.stem)
def test_job_has_help(job: Path):
    out = subprocess.run([sys.executable, str(job), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout and len(out.stdout.splitlines()) > 3
