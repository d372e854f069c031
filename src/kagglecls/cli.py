"""What every stage script shares: logging set-up, params loading, and one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import logging
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
    name: str, body: Callable[[argparse.Namespace, Params], None], parser: argparse.ArgumentParser
) -> None:
    """Parse arguments, load and validate params, run `body`; user errors exit 2 with one line on stderr."""
    logging.basicConfig(
        level=logging.INFO, format=f"%(asctime)s {name} %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    arguments = parser.parse_args()
    try:
        params = load_params(arguments.params)
        body(arguments, params)
    except UserError as error:
        print(f"{name}: error: {error}", file=sys.stderr)
        sys.exit(2)
