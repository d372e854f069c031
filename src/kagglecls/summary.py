"""`python -m kagglecls.summary`: where the submission is and the validation figures of each stage."""

from __future__ import annotations

import json
import sys
from pathlib import Path

STAGES = ("train_head", "train_augmented", "finetune", "predict_tta")


def main(live_dir: Path = Path("dvclive"), submission: Path = Path("data/submission.csv")) -> int:
    if not submission.is_file():
        print(f"no submission at {submission}: run `dvc repro` first", file=sys.stderr)
        return 1
    print(f"submission: {submission.resolve()}")
    for stage in STAGES:
        path = live_dir / stage / "metrics.json"
        if path.is_file():
            metrics = json.loads(path.read_text())[stage]
            print(
                f"{stage:>16}: valid log loss {metrics['log_loss']:.4f}, accuracy {metrics['accuracy']:.4f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
