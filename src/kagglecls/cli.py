"""What every stage script shares: logging set-up, params loading, and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from kagglecls.errors import UserError
from kagglecls.params import Params, load_params


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
    distributed: bool = False,
) -> None:
    """Parse arguments, load and validate params, run `body`; user errors exit 2 with one line on stderr.
    A `distributed` stage with base.nproc > 1 runs as that many torchrun processes (DistributedDataParallel)."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    arguments = parser.parse_args()
    try:
        params = load_params(arguments.params)
        if distributed and params.base.nproc > 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
            sys.exit(_under_torchrun(name, params.base.nproc, device=params.base.device))
        body(arguments, params)
    except UserError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        sys.exit(2)


def _under_torchrun(name: str, nproc: int, *, device: str) -> int:
    """This stage script again, as `torchrun --standalone --nproc_per_node nproc` would start it; the exit code.
    Launched from here rather than from dvc.yaml's cmd: torchrun's own process costs 3-5 s, paid only when
    there is more than one process to start."""
    import torch
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    gpus = torch.cuda.device_count() if device != "cpu" else 0
    if 0 < gpus < nproc:
        raise UserError(
            f"base.nproc: {nproc} processes but {gpus} CUDA devices here; at most one process a GPU"
        )
    # torchrun would give each process one thread; on a CPU they share the cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    logging.getLogger(__name__).info("running %s as %d torchrun processes", name, nproc)
    try:
        torchrun(["--standalone", "--nproc_per_node", str(nproc), sys.argv[0], *sys.argv[1:]])
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()  # the cause; torchrun then stops the other processes
        print(
            f"{name}: error: torchrun process {rank} of {nproc} failed with exit code {failure.exitcode} "
            "(its message is above); the others were stopped",
            file=sys.stderr,
        )
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as error:  # Ctrl-C or a kill: the processes are stopped, no traceback
        print(f"{name}: stopped by {error.sigval.name}", file=sys.stderr)
        return 128 + int(error.sigval)
    return 0
