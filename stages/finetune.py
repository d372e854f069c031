"""Stage finetune: unfreeze, differential learning rates, SGDR with cycle_mult, progressive resizing.

Saves a checkpoint each epoch; a rerun after an interruption resumes from it (with folds, the finished folds
resume with nothing left to train). Run by DVC: `python stages/finetune.py --reorganised data/reorganised
--cache data/cache --input models/augmented.pt --input-folds models/folds/augmented --model models/finetune.pt
--checkpoint models/checkpoints/finetune.pt --live dvclive/finetune --folds models/folds/finetune`.
With base.nproc > 1 it runs as that many torchrun processes (DistributedDataParallel).
"""

from pathlib import Path

from kagglecls import fitting
from kagglecls.cli import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--reorganised", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--input-folds", type=Path, required=True, help="train_augmented's folds 2..k")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True, help="dvclive's folder: metrics and plots")
    parser.add_argument(
        "--folds",
        type=Path,
        required=True,
        help="folds 2..k's models and dvclive folders, with cv.folds k > 1",
    )

    def body(arguments, params) -> None:
        outputs = fitting.StageOutputs(
            model=arguments.model,
            live=arguments.live,
            checkpoint=arguments.checkpoint,
            folds=arguments.folds,
        )
        fitting.finetune(
            params=params,
            reorganised=arguments.reorganised,
            cache_dir=arguments.cache,
            model_path=arguments.input,
            model_folds=arguments.input_folds,
            outputs=outputs,
        )

    run_stage("finetune", body, parser, distributed=True)


if __name__ == "__main__":
    main()
