"""Stage size_histogram: widths and heights of the training images, as a PNG and a JSON summary.

Run by DVC: `python stages/size_histogram.py --reorganised data/reorganised --png plots/size_histogram.png
--summary plots/size_histogram.json`.
"""

from pathlib import Path

from kagglecls import plots
from kagglecls.cli import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--reorganised", type=Path, required=True)
    parser.add_argument("--png", type=Path, required=True)
    parser.add_argument("--summary", type=Path, required=True)

    def body(arguments, params) -> None:
        plots.size_histogram(reorganised=arguments.reorganised, png=arguments.png, summary=arguments.summary)

    run_stage("size_histogram", body, parser)


if __name__ == "__main__":
    main()
