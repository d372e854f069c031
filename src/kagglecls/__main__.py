"""`kagglecls COMMAND ...`, the console script (also `python -m kagglecls COMMAND ...`). Commands: predict, submissions, ensemble."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kagglecls import ensemble, predict, submit


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kagglecls",
        description="Use what the pipeline made: its model, its predictions, its submissions.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    predict.add_arguments(
        commands.add_parser(
            "predict",
            help="the exported model's classes for image files",
            description="The exported model's top classes for image files and folders, printed or as CSV.",
        )
    )
    submit.add_submissions_arguments(
        commands.add_parser(
            "submissions",
            help="submissions/history.csv beside Kaggle's list: status and public score of each",
            description="This project's submissions (submissions/history.csv), their status and public score "
            "refreshed from Kaggle, and Kaggle's latest ones made elsewhere.",
        )
    )
    ensemble.add_arguments(
        commands.add_parser(
            "ensemble",
            help="several experiments' test probabilities averaged into one submission",
            description=ensemble.__doc__.split("\n\n")[0],
        )
    )
    arguments = parser.parse_args(argv)
    if arguments.command == "ensemble":
        return ensemble.run(arguments)
    if arguments.command == "submissions":
        return submit.run_submissions(arguments)
    return predict.run(arguments)


if __name__ == "__main__":
    sys.exit(main())
