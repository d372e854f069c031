"""Stage export: the fine-tuned model as one file that loads with torch alone (torch.export; class names, image
size, normalisation, preprocessing and TTA settings inside), for `kagglecls predict`.

Run by DVC: `python stages/export.py --model models/finetune.pt --model-folds models/folds/finetune
--out models/export.pt2`. It exports fold 1's model (with one split, the only one), or with
final.train_on_all the model of all the data.
"""

from pathlib import Path

from kagglecls import export
from kagglecls.cli import run_stage, stage_parser
from kagglecls.loading import ALL_DATA, fold_model


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--model-folds", type=Path, required=True, help="finetune's folds 2..k and all")
    parser.add_argument("--out", type=Path, required=True)

    def body(arguments, params) -> None:
        fold = ALL_DATA if params.final.train_on_all else 1
        model = fold_model(arguments.model, arguments.model_folds, fold)
        export.export_model(params=params, model_path=model, out=arguments.out)

    run_stage("export", body, parser)


if __name__ == "__main__":
    main()
