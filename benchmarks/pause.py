"""Pause long training runs while a speed benchmark times anything.

Long runs (the PSG paper schedule, LSQ's long schedules) share this machine with the speed
benchmarks; a timing taken beside them measures the contention, not the code. ``paused()``
stops every other process running one of ``TRAINING_SCRIPTS`` (SIGSTOP) for the duration of a
``with`` block and resumes them (SIGCONT) afterwards, also when the benchmark fails; a stopped
training run loses nothing (its step is simply suspended). The benchmark records how many runs
it paused, so its table can say that its rows were taken with training paused.
"""
from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

TRAINING_SCRIPTS = ("psg_train.py", "qat_train.py", "compress_train.py", "lowbit train",
                    "deploy_any_cnn.py", "method_matrix.py", "binary_recipe.py",
                    "deep_compression.py", "mixed_precision.py", "mobilenet_ptq.py")


def training_processes() -> list[int]:
    """Process ids (other than this one and its parents) whose command line names a training
    script."""
    mine = {os.getpid(), os.getppid()}
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in mine:
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(script in command for script in TRAINING_SCRIPTS):
            found.append(int(entry.name))
    return found


@contextlib.contextmanager
def paused():
    """Stop the training processes for the block; yields their ids."""
    stopped = []
    for pid in training_processes():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
    try:
        yield stopped
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
