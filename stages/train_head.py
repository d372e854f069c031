"""Stage train_head: lr_find, then the new head trained on the precomputed activations.

Run by DVC: `python stages/train_head.py --reorganised data/reorganised --features data/features
--model models/head.pt --live dvclive/train_head --folds models/folds/head`.
"""

from pathlib import Path

from kagglecls import fitting
from kagglecls.cli import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--reorganised", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True, help="dvclive's folder: metrics and plots")
    parser.add_argument(
        "--folds",
        type=Path,
        required=True,
        help="folds 2..k's models and dvclive folders, with cv.folds k > 1",
    )

    def body(arguments, params) -> None:
        outputs = fitting.StageOutputs(model=arguments.model, live=arguments.live, folds=arguments.folds)
        fitting.train_head(
            params=params, reorganised=arguments.reorganised, features_dir=arguments.features, outputs=outputs
        )

    run_stage("train_head", body, parser)


if __name__ == "__main__":
    main()
