"""Stage precompute: activations of the frozen pretrained body for train, valid and test (no augmentation).

Run by DVC: `python stages/precompute.py --reorganised data/reorganised --cache data/cache --out data/features`.
"""

from pathlib import Path

from kagglecls import features
from kagglecls.cli import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--reorganised", type=Path, required=True)
    parser.add_argument(
        "--cache", type=Path, required=True, help="pre-resized image cache (content-addressed)"
    )
    parser.add_argument("--out", type=Path, required=True)

    def body(arguments, params) -> None:
        features.precompute(
            params=params, reorganised=arguments.reorganised, cache_dir=arguments.cache, out_dir=arguments.out
        )

    run_stage("precompute", body, parser)


if __name__ == "__main__":
    main()
