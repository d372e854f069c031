"""Stage train_augmented: the head trained on augmented images through the frozen body, SGDR with cycle_len.

Run by DVC: `python stages/train_augmented.py --reorganised data/reorganised --cache data/cache
--features data/features --head models/head.pt --head-folds models/folds/head --model models/augmented.pt
--live dvclive/train_augmented --folds models/folds/augmented`.
With base.nproc > 1 it runs as that many torchrun processes (DistributedDataParallel).
"""

from pathlib import Path

from kagglecls import fitting
from kagglecls.cli import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--reorganised", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--features", type=Path, required=True)
    parser.add_argument("--head", type=Path, required=True)
    parser.add_argument("--head-folds", type=Path, required=True, help="train_head's folds 2..k")
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
        fitting.train_augmented(
            params=params,
            reorganised=arguments.reorganised,
            cache_dir=arguments.cache,
            features_dir=arguments.features,
            head_path=arguments.head,
            head_folds=arguments.head_folds,
            outputs=outputs,
        )

    run_stage("train_augmented", body, parser, distributed=True)


if __name__ == "__main__":
    main()
