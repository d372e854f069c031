"""Stage submission: data/submission.csv with exactly the columns and id order of sample_submission.csv.

Run by DVC: `python stages/submission.py --raw data/raw --reorganised data/reorganised
--predictions data/predictions/test.npz --out data/submission.csv`.
"""

from pathlib import Path

from kagglecls import submission
from kagglecls.cli import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--raw", type=Path, required=True)
    parser.add_argument("--reorganised", type=Path, required=True)
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)

    def body(arguments, params) -> None:
        submission.make_submission(
            params=params,
            raw_dir=arguments.raw,
            reorganised=arguments.reorganised,
            predictions=arguments.predictions,
            out_csv=arguments.out,
        )

    run_stage("submission", body, parser)


if __name__ == "__main__":
    main()
