"""What every benchmark script shares: the cache folder, a warm page cache, and measuring one command alone.

A command is measured by :func:`run_measured`: wall time, peak RSS and CPU time of that command only, after a
``sync`` outside the timing, optionally beside one competing CPU-bound process (:func:`competing_load`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"

# Runs the command and prints its CPU seconds and peak RSS (KiB). A child's ru_maxrss counts the pages it shared
# with its parent before exec, so the command is started from this small wrapper rather than from the benchmark
# process itself.
WRAPPER = """
import resource, subprocess, sys
code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(usage.ru_utime + usage.ru_stime, usage.ru_maxrss)
sys.exit(code)
"""

# The CPU-bound process of the "under load" measurements.
SPINNER = [sys.executable, "-S", "-c", "while True: pass"]


class CommandFailed(SystemExit):
    """A measured command exited non-zero; uncaught it ends the benchmark with the command's stderr tail."""


def lorafuse_command() -> list[str]:
    """The installed ``lorafuse`` command, as a user runs it (``python -m lorafuse`` when no script is on PATH)."""
    script = shutil.which("lorafuse")
    return [script] if script else [sys.executable, "-m", "lorafuse"]


def warm(paths: list[Path]) -> None:
    """Read every file once so all commands start with the inputs in the page cache."""
    for root in paths:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                with open(path, "rb") as handle:
                    while handle.read(64 << 20):
                        pass


@contextmanager
def competing_load() -> Iterator[None]:
    """One other CPU-bound process (``while True: pass``) for the duration of the block."""
    spinner = subprocess.Popen(SPINNER)
    try:
        time.sleep(0.2)  # spinning before the measured command starts
        yield
    finally:
        spinner.kill()
        spinner.wait()


def run_measured(cmd: list[str], env: dict[str, str] | None = None, load: bool = False) -> tuple[float, int, float]:
    """Run ``cmd`` (with ``env`` added to the environment, beside :func:`competing_load` when ``load``).

    Returns (wall s, peak RSS in bytes, CPU s) of the command alone; raises :class:`CommandFailed` when it fails.
    """
    with competing_load() if load else nullcontext():
        os.sync()  # flush the previous output's dirty pages outside the timing
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-S", "-c", WRAPPER, *cmd],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **(env or {})},
        )
        elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise CommandFailed(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    cpu, rss = proc.stdout.split()[-2:]
    return elapsed, int(rss) * 1024, float(cpu)  # Linux reports ru_maxrss in KiB


def decoder_linear_shapes(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    """(out, in) of each LoRA-targeted linear layer of one Llama/Qwen-style decoder layer."""
    q, kv = heads * head_dim, kv_heads * head_dim
    return {
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (intermediate, hidden),
        "mlp.up_proj": (intermediate, hidden),
        "mlp.down_proj": (hidden, intermediate),
    }
