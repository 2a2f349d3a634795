"""Silencing C and C++ libraries that write to the process's file descriptors directly."""
from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def silenced(fd: int):
    """Point file descriptor ``fd`` (1: stdout, 2: stderr) at /dev/null for the block: the
    profiler's C++ side logs every start and stop to 2, HiGHS prints a banner to 1."""
    (sys.stdout if fd == 1 else sys.stderr).flush()
    saved = os.dup(fd)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), fd)
        try:
            yield
        finally:
            os.dup2(saved, fd)
            os.close(saved)
