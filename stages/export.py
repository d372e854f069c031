"""Stage export: the fine-tuned model as one file that loads with torch alone (torch.export; class names, image
size, normalisation, preprocessing and TTA settings inside), for `kagglecls predict`.

Run by DVC: `python stages/export.py --model models/finetune.pt --out models/export.pt2`.
"""

from pathlib import Path

from kagglecls import export
from kagglecls.cli import run_stage, stage_parser


def main() -> None:
    parser = stage_parser(__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)

    def body(arguments, params) -> None:
        export.export_model(params=params, model_path=arguments.model, out=arguments.out)

    run_stage("export", body, parser)


if __name__ == "__main__":
    main()
