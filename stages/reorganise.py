"""Stage reorganise: train/valid class folders (stratified split), the test set, a manifest, a bad-image report.

Run by DVC: `python stages/reorganise.py --raw data/raw --out data/reorganised`.
"""

from pathlib import Path

from kagglecls import reorganise
from kagglecls.cli import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--raw", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)

    def body(arguments, params) -> None:
        reorganise.reorganise(params=params, raw_dir=arguments.raw, out_dir=arguments.out)

    run_stage("reorganise", body, parser)


if __name__ == "__main__":
    main()
