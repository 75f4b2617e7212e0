"""A btfast CLI job run in a child process and killed with SIGKILL once it has written some chunks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def kill_after_chunks(args: list[str], out: Path, chunks: int = 3, timeout_s: float = 120) -> int:
    """Run `btfast <args> --out out`, SIGKILL it once its progress file records `chunks` chunks, and return how
    many chunks it recorded (the job must not have finished)."""
    progress = Path(str(out) + ".btfast-progress")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "btfast.cli", *args, "--out", str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if progress.exists() and progress.read_text().count('"chunk"') >= chunks:
            break
        if proc.poll() is not None:
            pytest.fail(f"{args[0]} exited before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    text = progress.read_text()
    assert '"finished"' not in text
    return text.count('"chunk"')
