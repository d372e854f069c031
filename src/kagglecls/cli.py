"""What every stage script shares: logging set-up, params loading, and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
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
    only the first process of a torchrun draws (the others write nothing)."""
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
