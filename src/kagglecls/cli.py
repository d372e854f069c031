"""What every stage script shares: logging set-up, params loading, and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import logging
import multiprocessing
import os
import platform
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from kagglecls import plots
from kagglecls.errors import UserError
from kagglecls.params import Params, load_params

log = logging.getLogger("kagglecls")


def stage_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)"
    )
    return parser


def run_stage(
    name: str,
    body: Callable[[argparse.Namespace, Params], None],
    parser: argparse.ArgumentParser,
    *,
    draws_figures: bool = False,
) -> None:
    """Parse arguments, load and validate params, run `body`; user errors exit 2 with one line on stderr.

    A stage that `draws_figures` has them drawn by a child process (plots.drawn_in_background) started
    here, before `body` imports torch, so that matplotlib's import and the drawing overlap the stage's work;
    only the first process of a torchrun draws (the others write nothing). Freed memory is kept for reuse
    (keep_freed_memory). A stage that succeeds ends at once (end_without_teardown)."""
    keep_freed_memory()
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    arguments = parser.parse_args()
    first_process = os.environ.get("RANK", "0") == "0"
    drawing = plots.drawn_in_background() if draws_figures and first_process else contextlib.nullcontext()
    try:
        with drawing:
            params = load_params(arguments.params)
            body(arguments, params)
    except UserError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        sys.exit(2)
    end_without_teardown()


# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for the next allocation instead of handing it back to the system.

    By default every block over 32 MB gets a mapping of its own, unmapped when freed, and the system zeroes
    each of its pages again on first touch. A network's activations are such blocks: Lite0's largest map is
    50 MB for a batch of 128 images at 64 px (precompute's), and 38 MB for a batch of 8 at 224 px. Served from
    the heap instead, the same memory is reused batch after batch. bench/bench_allocator.py: the frozen body's
    forward 2.0x faster at 64 px and 2.6x at 224 px, a finetune step 1.19x at 96 px and 1.08x at 224 px, for
    7-19% more peak memory. Only where memory comes from changes: outputs are the same bytes. Returns whether
    it applied (glibc only: musl and macOS keep their own allocator).
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    no_mappings = libc.mallopt(M_MMAP_MAX, 0)
    no_trimming = libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    return bool(no_mappings and no_trimming)


def end_without_teardown() -> None:
    """End the process now that every output is written and closed, skipping the interpreter's teardown:
    with torch imported it frees each module and runs the CUDA libraries' destructors, 0.5 s a stage that
    writes nothing. Logs and standard streams are flushed first. Where something is still running (a child
    process such as a loader worker, a non-daemon thread) or under torchrun (its process group), returns and
    leaves the exit to Python, which waits for them."""
    still_running = multiprocessing.active_children() or any(
        thread.is_alive() and not thread.daemon and thread is not threading.main_thread()
        for thread in threading.enumerate()
    )
    if still_running or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
