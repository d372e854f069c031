"""Stage download: the competition as Kaggle ships it, extracted (or the embedded sample, built the same way).

Run by DVC: `python stages/download.py --out data/raw`. Reads data.source, data.competition, data.sample, base.seed.
"""

from pathlib import Path

from kagglecls import kaggle_io
from kagglecls.cli import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--out", type=Path, required=True)
    run_stage(
        "download", lambda arguments, params: kaggle_io.download(params=params, dest=arguments.out), parser
    )


if __name__ == "__main__":
    main()
