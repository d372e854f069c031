"""Stage predict_tta: TTA on valid (metrics, confusion matrix, top losses) and on test (probabilities); with
cv.folds k > 1, each fold's model on the images it held out (the CV figures) and on test (averaged).

Run by DVC: `python stages/predict_tta.py --reorganised data/reorganised --cache data/cache
--model models/finetune.pt --model-folds models/folds/finetune --live dvclive/predict_tta
--predictions data/predictions/test.npz --valid-predictions data/predictions/valid.npz`.
"""

from pathlib import Path

from kagglecls import predict
from kagglecls.cli import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--reorganised", type=Path, required=True)
    parser.add_argument("--cache", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--model-folds", type=Path, required=True, help="finetune's folds 2..k")
    parser.add_argument("--live", type=Path, required=True, help="dvclive's folder: metrics and plots")
    parser.add_argument("--predictions", type=Path, required=True, help="test probabilities (.npz)")
    parser.add_argument(
        "--valid-predictions", type=Path, help="valid probabilities (.npz), for kagglecls ensemble"
    )

    def body(arguments, params) -> None:
        predict.predict_tta(
            params=params,
            reorganised=arguments.reorganised,
            cache_dir=arguments.cache,
            model_path=arguments.model,
            model_folds=arguments.model_folds,
            live_dir=arguments.live,
            predictions=arguments.predictions,
            valid_predictions=arguments.valid_predictions,
        )

    run_stage("predict_tta", body, parser)


if __name__ == "__main__":
    main()
