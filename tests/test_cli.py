"""kagglecls.cli.run_stage as a stage process sees it: outputs, logs and exit status."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAGE = textwrap.dedent(
    """
    import atexit, sys, threading, time
    from pathlib import Path
    from kagglecls.cli import run_stage, stage_parser
    from kagglecls.errors import UserError

    atexit.register(lambda: print("interpreter teardown ran", file=sys.stderr, flush=True))

    def body(arguments, params):
        print("printed to a pipe, so buffered")
        if arguments.mode == "user-error":
            raise UserError("params.yaml: base.seed: expected an integer, found 'x'")
        if arguments.mode == "thread":
            def finish():
                time.sleep(0.3)
                (arguments.out.parent / "late.txt").write_text("written by a thread after body returned")
            threading.Thread(target=finish).start()
        arguments.out.write_text(f"seed {params.base.seed}")

    parser = stage_parser("a test stage")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--mode", default="plain")
    run_stage("test_stage", body, parser)
    """
)


def _run_stage(tmp_path: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text().replace("seed: 42", "seed: 7"))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "out.txt"), "--mode", mode],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_stage_that_succeeds_flushes_its_output_and_exits_normally(tmp_path):
    result = _run_stage(tmp_path, "plain")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.txt").read_text() == "seed 7"
    assert result.stdout == "printed to a pipe, so buffered\n"
    assert "interpreter teardown ran" in result.stderr


def test_a_thread_still_running_when_the_stage_returns_finishes_its_work(tmp_path):
    result = _run_stage(tmp_path, "thread")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.txt").read_text() == "seed 7"
    assert (tmp_path / "late.txt").read_text() == "written by a thread after body returned"


def test_a_user_error_exits_2_with_one_line_and_writes_nothing(tmp_path):
    result = _run_stage(tmp_path, "user-error")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-2:] == [
        "test_stage: error: params.yaml: base.seed: expected an integer, found 'x'",
        "interpreter teardown ran",
    ]
    assert not (tmp_path / "out.txt").exists()
