"""A btfast CLI job run in a child process and interrupted with SIGKILL at a known point; one torch thread.

The child interrupts itself through the test-only hook `BTFAST_TEST_INTERRUPT=N:SIGNAL` (see
`btfast.score.config.interrupt_from_env`) once N chunks are durable: `KILL` makes it SIGKILL itself; `STOP` makes
it stop itself, and the test then sends the real `kill -9` from outside. Neither races the clock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from btfast.score.config import INTERRUPT_ENV

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: OpenMP with 2 threads waits on busy cores (100x slower here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def interrupted(argv: list[str], chunks: int, how: str = "KILL", timeout_s: float = 600) -> None:
    """Run `argv` (a command line) until it has made `chunks` chunks durable, then see it die of SIGKILL: by its
    own hand (`how="KILL"`), or stopped there and killed from here (`how="STOP"`)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **{INTERRUPT_ENV: f"{chunks}:{how}"})
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watchdog = threading.Timer(timeout_s, proc.kill)
    watchdog.start()
    try:
        if how == "STOP":
            _, status = os.waitpid(proc.pid, os.WUNTRACED)  # until it stops itself (or ends)
            if not os.WIFSTOPPED(status):
                proc.returncode = os.waitstatus_to_exitcode(status)
                pytest.fail(
                    f"the job ended ({proc.returncode}) before it stopped: {proc.stderr.read().decode()[-3000:]}"
                )
            os.kill(proc.pid, signal.SIGKILL)  # kill -9 of a real, stopped process
        proc.wait()
    finally:
        watchdog.cancel()
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(f"the job exited with {proc.returncode}, not SIGKILL: {proc.stderr.read().decode()[-3000:]}")


def kill_after_chunks(args: list[str], out: Path, chunks: int = 3, how: str = "KILL") -> int:
    """Run `btfast <args> --out out`, SIGKILLed once its progress file records `chunks` chunks; returns the number
    of chunks recorded (exactly `chunks`: the hook fires after the record is durable)."""
    interrupted([sys.executable, "-m", "btfast.cli", *args, "--out", str(out)], chunks, how)
    text = Path(str(out) + ".btfast-progress").read_text()
    assert '"finished"' not in text
    return text.count('"chunk"')
