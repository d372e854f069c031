"""Submitting through the real kaggle client to the stand-in server; refusing invalid files before any upload."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from kaggle_server import (
    SUBMISSION_REF,
    apply_kaggle_env,
    assert_no_credentials,
    kaggle_env,
    serve_competition,
    subprocess_env,
)

import kagglecls
from kagglecls import kaggle_io
from kagglecls.__main__ import main as kagglecls_main
from kagglecls.kaggle_io import KaggleError, Uploaded, submit, wait_for_score
from kagglecls.submit import HISTORY_COLUMNS, SubmissionError, _validate, main, submission_description

COMPETITION = "dog-breed-identification"
SAMPLE = "id,boston_bull,dingo\na1,0.5,0.5\nb2,0.5,0.5\nc3,0.5,0.5\n"
GOOD = "id,boston_bull,dingo\na1,0.9,0.1\nb2,0.2,0.8\nc3,0.6,0.4\n"


@pytest.fixture(autouse=True)
def credentials_never_shown(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]):
    caplog.set_level(logging.DEBUG)
    yield
    captured = capsys.readouterr()
    assert_no_credentials(caplog.text + captured.out + captured.err)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder (the working directory) with a sample, a submission, params and metrics."""
    root = tmp_path / "project"
    (root / "data" / "raw").mkdir(parents=True)
    (root / "dvclive" / "predict_tta").mkdir(parents=True)
    (root / "data" / "raw" / "sample_submission.csv").write_text(SAMPLE)
    (root / "data" / "submission.csv").write_text(GOOD)
    (root / "params.yaml").write_text(f"data:\n  competition: {COMPETITION}\n")
    (root / "dvclive" / "predict_tta" / "metrics.json").write_text(
        json.dumps({"predict_tta": {"log_loss": 0.43214, "accuracy": 0.9}, "step": 0})
    )
    monkeypatch.chdir(root)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return root


def git(*arguments: str, cwd: Path) -> str:
    identity = ["-c", "user.name=Test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]
    return subprocess.run(
        ["git", *identity, *arguments], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout


def calls(requests: list, method: str) -> list:
    return [request for request in requests if request.api_method == method]


def test_submit_uploads_the_file_and_returns_the_server_message(tmp_path, monkeypatch):
    submission = tmp_path / "submission.csv"
    submission.write_text(GOOD)
    with serve_competition({COMPETITION: b""}, submission_message="Successfully submitted to Dog Breed") as (
        port,
        requests,
    ):
        apply_kaggle_env(monkeypatch, kaggle_env(port, tmp_path))
        answer = submit(
            submission_csv=submission, competition=COMPETITION, message="first try | commit abc1234"
        )

    assert answer == Uploaded(message="Successfully submitted to Dog Breed", ref=SUBMISSION_REF)
    start = calls(requests, "StartSubmissionUpload")[0].json()
    assert (start["competitionName"], start["fileName"], start["contentLength"]) == (
        COMPETITION,
        "submission.csv",
        len(GOOD.encode()),
    )
    uploads = [request for request in requests if request.method == "PUT"]
    assert [upload.body for upload in uploads] == [submission.read_bytes()]
    create = calls(requests, "CreateSubmission")[0].json()
    assert create == {
        "competitionName": COMPETITION,
        "blobFileTokens": uploads[0].path.removeprefix("/upload/"),
        "submissionDescription": "first try | commit abc1234",
    }


def test_main_names_commit_experiment_and_log_loss(project, monkeypatch):
    git("init", "-q", cwd=project)
    git("add", "params.yaml", cwd=project)
    git("commit", "-q", "-m", "params", cwd=project)
    commit = git("rev-parse", "--short", "HEAD", cwd=project).strip()
    monkeypatch.setenv("DVC_EXP_NAME", "exp-stand-in")
    with serve_competition({COMPETITION: b""}) as (port, requests):
        apply_kaggle_env(monkeypatch, kaggle_env(port, project.parent))
        assert main(["--message", "resnet34, 3 cycles"]) == 0

    create = calls(requests, "CreateSubmission")[0].json()
    assert create["competitionName"] == COMPETITION  # read from params.yaml
    assert create["submissionDescription"] == (
        f"resnet34, 3 cycles | commit {commit} | experiment exp-stand-in | valid log loss 0.4321"
    )
    assert [request.body for request in requests if request.method == "PUT"] == [GOOD.encode()]


def test_description_marks_a_dirty_checkout_and_skips_what_is_unknown(project):
    git("init", "-q", cwd=project)
    git("add", "params.yaml", cwd=project)
    git("commit", "-q", "-m", "params", cwd=project)
    commit = git("rev-parse", "--short", "HEAD", cwd=project).strip()
    (project / "params.yaml").write_text("data:\n  competition: other\n")
    description = submission_description(message="", metrics_path=project / "dvclive" / "missing.json")
    assert description == f"kagglecls | commit {commit}-dirty"


def test_a_new_history_row_does_not_make_the_checkout_dirty(project):
    (project / "submissions").mkdir()
    (project / "submissions" / "history.csv").write_text(",".join(HISTORY_COLUMNS) + "\n")
    git("init", "-q", cwd=project)
    git("add", "params.yaml", "submissions/history.csv", cwd=project)
    git("commit", "-q", "-m", "params", cwd=project)
    commit = git("rev-parse", "--short", "HEAD", cwd=project).strip()
    with open(project / "submissions" / "history.csv", "a") as handle:
        handle.write("2026-12-01T10:00:00Z,x,1,,,,,pending,,\n")
    description = submission_description(message="", metrics_path=project / "dvclive" / "missing.json")
    assert description == f"kagglecls | commit {commit}"


@pytest.mark.parametrize(
    ("submission", "message"),
    [
        (
            "id,boston_bull,pug\na1,0.9,0.1\nb2,0.2,0.8\nc3,0.6,0.4\n",
            "column 3 is 'pug' where the sample has 'dingo'",
        ),
        ("id,boston_bull\na1,0.9\nb2,0.2\nc3,0.6\n", "column 3 is nothing where the sample has 'dingo'"),
        (
            "id,boston_bull,dingo\nb2,0.2,0.8\na1,0.9,0.1\nc3,0.6,0.4\n",
            "row 1 is id 'b2' where the sample has id 'a1'",
        ),
        ("id,boston_bull,dingo\na1,0.9,0.1\nb2,0.2,0.8\n", "row 3 is missing where the sample has id 'c3'"),
        (
            "id,boston_bull,dingo\na1,0.9,0.1\nb2,nan,0.8\nc3,0.6,0.4\n",
            "row 2 (id 'b2'): column 'boston_bull' is 'nan', expected a finite",
        ),
        (
            "id,boston_bull,dingo\na1,0.9,0.1\nb2,0.2,0.8\nc3,0.6,inf\n",
            "row 3 (id 'c3'): column 'dingo' is inf, expected a finite",
        ),
        (
            "id,boston_bull,dingo\na1,0.9,0.1\nb2,0.2\nc3,0.6,0.4\n",
            "row 2 (id 'b2'): column 'dingo' is '', expected a finite",
        ),
    ],
)
def test_validate_names_what_is_wrong(tmp_path, submission, message):
    (tmp_path / "sample.csv").write_text(SAMPLE)
    (tmp_path / "submission.csv").write_text(submission)
    with pytest.raises(SubmissionError) as error:
        _validate(tmp_path / "submission.csv", tmp_path / "sample.csv")
    assert message in str(error.value)
    assert str(error.value).startswith(str(tmp_path / "submission.csv"))


def test_validate_accepts_the_three_submission_formats(tmp_path):
    formats = {
        "probabilities": ("id,a,b\nx,0.5,0.5\ny,0.5,0.5\n", "id,a,b\nx,0.9,0.1\ny,1e-3,0.999\n"),
        "label": (
            "file,species\n1.png,Charlock\n2.png,Charlock\n",
            "file,species\n1.png,Maize\n2.png,Sugar beet\n",
        ),
        "positive probability": ("id,label\n1,0.5\n2,0.5\n", "id,label\n1,0.01\n2,1\n"),
    }
    for name, (sample, submission) in formats.items():
        (tmp_path / f"{name}-sample.csv").write_text(sample)
        (tmp_path / f"{name}.csv").write_text(submission)
        _validate(tmp_path / f"{name}.csv", tmp_path / f"{name}-sample.csv")


def test_main_refuses_an_invalid_file_before_any_upload(project, monkeypatch, capsys):
    (project / "data" / "submission.csv").write_text(
        "id,boston_bull,dingo\na1,0.9,0.1\nb2,nan,0.8\nc3,0.6,0.4\n"
    )
    with serve_competition({COMPETITION: b""}) as (port, requests):
        apply_kaggle_env(monkeypatch, kaggle_env(port, project.parent))
        with pytest.raises(SystemExit) as exit_info:
            main(["--message", "broken"])

    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "kagglecls-submit: error: data/submission.csv: submission row 2 (id 'b2'): column 'boston_bull' is "
        "'nan', expected a finite probability in [0, 1] (1 bad rows)\n"
    )
    assert requests == []


def test_console_entry_point_prints_one_line_and_exits_2(project, tmp_path):
    (project / "data" / "submission.csv").write_text("id,boston_bull,dingo\nzz,0.9,0.1\n")
    source_root = Path(kagglecls.__file__).parents[1]
    env = subprocess_env(kaggle_env(1, tmp_path)) | {"PYTHONPATH": str(source_root)}
    result = subprocess.run(
        [sys.executable, "-m", "kagglecls.submit"], cwd=project, env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "kagglecls-submit: error: data/submission.csv: submission row 1 is id 'zz' where the sample has id 'a1' "
        "(3 rows differ; 1 rows, the sample has 3; expected every sample id once, in the sample's order)"
    )
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_rules_not_accepted_on_submit(tmp_path, monkeypatch):
    submission = tmp_path / "submission.csv"
    submission.write_text(GOOD)
    with serve_competition({}, status_by_name={COMPETITION: 403}) as (port, requests):
        apply_kaggle_env(monkeypatch, kaggle_env(port, tmp_path))
        with pytest.raises(KaggleError) as error:
            submit(submission_csv=submission, competition=COMPETITION, message="x")
    assert "HTTP 403" in str(error.value)
    assert f"https://www.kaggle.com/competitions/{COMPETITION}/rules" in str(error.value)
    assert [request for request in requests if request.method == "PUT"] == []


def test_no_submissions_left_today(tmp_path, monkeypatch):
    submission = tmp_path / "submission.csv"
    submission.write_text(GOOD)
    limits = {"numToday": 5, "numTotal": 40, "numAllowedNow": 0}
    with serve_competition({COMPETITION: b""}, submission_limits=limits) as (port, requests):
        apply_kaggle_env(monkeypatch, kaggle_env(port, tmp_path))
        with pytest.raises(KaggleError) as error:
            submit(submission_csv=submission, competition=COMPETITION, message="x")
    assert str(error.value) == (
        f"no submissions left today for competition {COMPETITION!r} (5 made today, 40 in total); "
        "try again after the limit resets"
    )
    assert calls(requests, "StartSubmissionUpload") == []


def test_first_submission_of_a_new_user_is_not_blocked(tmp_path, monkeypatch):
    submission = tmp_path / "submission.csv"
    submission.write_text(GOOD)
    limits = {"numToday": 0, "numTotal": 0, "numAllowedNow": 0}  # Kaggle's answer before the team exists
    with serve_competition({COMPETITION: b""}, submission_limits=limits) as (port, requests):
        apply_kaggle_env(monkeypatch, kaggle_env(port, tmp_path))
        submit(submission_csv=submission, competition=COMPETITION, message="x")
    assert len(calls(requests, "CreateSubmission")) == 1


def test_missing_credentials_on_submit(tmp_path, monkeypatch):
    submission = tmp_path / "submission.csv"
    submission.write_text(GOOD)
    with serve_competition({COMPETITION: b""}) as (port, requests):
        apply_kaggle_env(monkeypatch, kaggle_env(port, tmp_path, credentials="none"))
        with pytest.raises(KaggleError, match=r"^no Kaggle credentials found"):
            submit(submission_csv=submission, competition=COMPETITION, message="x")
    assert requests == []
    assert not os.environ.get("KAGGLE_KEY")


# ---- waiting for the score; submissions/history.csv; `kagglecls submissions` ----


def history(project: Path) -> list[dict[str, str]]:
    with open(project / "submissions" / "history.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """wait_for_score's pauses, recorded instead of slept."""
    pauses: list[float] = []
    monkeypatch.setattr(kaggle_io, "_pause", pauses.append)
    return pauses


def test_wait_records_the_public_score_with_the_commit(project, monkeypatch, capsys, no_sleep):
    git("init", "-q", cwd=project)
    git("add", "params.yaml", cwd=project)
    git("commit", "-q", "-m", "params", cwd=project)
    commit = git("rev-parse", "--short", "HEAD", cwd=project).strip()
    monkeypatch.setenv("DVC_EXP_NAME", "exp-stand-in")
    states = [{"status": "PENDING"}, {"status": "PENDING"}, {"status": "COMPLETE", "publicScore": "0.31416"}]
    with serve_competition({COMPETITION: b""}, submission_states=states) as (port, requests):
        apply_kaggle_env(monkeypatch, kaggle_env(port, project.parent))
        assert main(["--message", "lite0", "--wait"]) == 0

    assert len(calls(requests, "ListSubmissions")) == 3
    assert no_sleep == [5.0, 10.0]  # backing off between the two pending answers
    (row,) = history(project)
    assert list(row) == list(HISTORY_COLUMNS)
    assert {key: row[key] for key in ("competition", "ref", "commit", "experiment", "valid_log_loss")} == {
        "competition": COMPETITION,
        "ref": str(SUBMISSION_REF),
        "commit": commit,
        "experiment": "exp-stand-in",
        "valid_log_loss": "0.4321",
    }
    assert (row["message"], row["status"], row["public_score"], row["error"]) == (
        "lite0",
        "complete",
        "0.31416",
        "",
    )
    assert capsys.readouterr().out.startswith(
        f"public score 0.31416: submission {SUBMISSION_REF}, lite0 | commit"
    )


def test_a_scoring_error_is_one_line_with_kaggles_message(project, monkeypatch, capsys, no_sleep):
    states = [
        {"status": "PENDING"},
        {"status": "ERROR", "errorDescription": "Submission has 3 rows, expected 10357"},
    ]
    with serve_competition({COMPETITION: b""}, submission_states=states) as (port, _):
        apply_kaggle_env(monkeypatch, kaggle_env(port, project.parent))
        with pytest.raises(SystemExit) as exit_info:
            main(["--wait"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"kagglecls-submit: error: Kaggle could not score submission {SUBMISSION_REF}: "
        "Submission has 3 rows, expected 10357\n"
    )
    (row,) = history(project)
    assert (row["status"], row["error"]) == ("error", "Submission has 3 rows, expected 10357")


def test_the_wait_gives_up_after_its_bound_with_a_warning_and_keeps_the_upload(
    project, monkeypatch, capsys, no_sleep
):
    with serve_competition({COMPETITION: b""}, submission_states=[{"status": "PENDING"}]) as (port, requests):
        apply_kaggle_env(monkeypatch, kaggle_env(port, project.parent))
        clock = iter(range(0, 1000, 20))  # each question to Kaggle 20 s after the last
        monkeypatch.setattr(kaggle_io, "_now", lambda: float(next(clock)))
        assert main(["--wait", "--wait-timeout", "60"]) == 0  # the upload went through: nothing to redo
    assert capsys.readouterr().err == (
        f"kagglecls-submit: warning: Kaggle had not scored submission {SUBMISSION_REF} after 60 s; it stays "
        "uploaded: `kagglecls submissions` shows its score once Kaggle has it\n"
    )
    assert len(calls(requests, "CreateSubmission")) == 1
    assert [row["status"] for row in history(project)] == ["pending"]


def test_wait_for_score_backs_off_up_to_its_longest_pause(tmp_path, monkeypatch, no_sleep):
    states = [{"status": "PENDING"}] * 6 + [{"status": "COMPLETE", "publicScore": "1.5"}]
    with serve_competition({COMPETITION: b""}, submission_states=states) as (port, _):
        apply_kaggle_env(monkeypatch, kaggle_env(port, tmp_path))
        scored = wait_for_score(competition=COMPETITION, ref=SUBMISSION_REF, timeout_s=3600, max_delay_s=30)
    assert (scored.status, scored.public_score) == ("complete", "1.5")
    assert no_sleep == [5.0, 10.0, 20.0, 30.0, 30.0, 30.0]


def test_kagglecls_submissions_refreshes_the_history_and_lists_the_others(project, monkeypatch, capsys):
    (project / "submissions").mkdir()
    (project / "submissions" / "history.csv").write_text(
        ",".join(HISTORY_COLUMNS) + "\n"
        f"2026-12-01T10:00:00Z,{COMPETITION},{SUBMISSION_REF},abc1234,exp-a,0.4321,lite0,pending,,\n"
        f"2026-11-30T10:00:00Z,{COMPETITION},17,abc1233,,0.5,older,complete,0.6,\n"
        "2026-11-30T09:00:00Z,another-competition,18,abc1232,,0.7,elsewhere,complete,0.8,\n"
    )
    elsewhere = {"ref": 99, "status": "COMPLETE", "publicScore": "0.7", "description": "from a notebook"}
    with serve_competition({COMPETITION: b""}, other_submissions=[elsewhere]) as (port, requests):
        apply_kaggle_env(monkeypatch, kaggle_env(port, project.parent))
        assert kagglecls_main(["submissions"]) == 0

    assert calls(requests, "ListSubmissions")[0].json()["competitionName"] == COMPETITION
    rows = history(project)
    assert [(row["ref"], row["status"], row["public_score"]) for row in rows] == [
        (str(SUBMISSION_REF), "complete", "0.12345"),  # the stand-in's default answer
        ("17", "complete", "0.6"),
        ("18", "complete", "0.8"),
    ]
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "ref", "submitted_at", "status", "public_score", "valid_log_loss", "commit", "experiment", "message"
    ]  # fmt: skip
    assert lines[1].split() == [
        str(SUBMISSION_REF), "2026-12-01T10:00:00Z", "complete", "0.12345", "0.4321", "abc1234", "exp-a", "lite0"
    ]  # fmt: skip
    assert lines[2].split()[:4] == ["17", "2026-11-30T10:00:00Z", "complete", "0.6"]
    # Kaggle's own list adds the one made elsewhere; the other competition's submission is left out.
    assert lines[3].split()[:3] == ["99", "complete", "0.7"]
    assert lines[3].endswith("(not in submissions/history.csv) from a notebook")
    assert len(lines) == 4


def test_the_wait_asks_again_after_kaggle_is_briefly_unavailable(tmp_path, monkeypatch, no_sleep):
    answers = iter([kaggle_io.KaggleUnavailable("Kaggle answered HTTP 503"), []])

    def flaky(*, competition):
        answer = next(answers, None)
        if isinstance(answer, Exception):
            raise answer
        return [kaggle_io.Scored(ref=7, status="complete", public_score="0.5")] if answer is None else answer

    monkeypatch.setattr(kaggle_io, "list_submissions", flaky)
    scored = wait_for_score(competition=COMPETITION, ref=7, timeout_s=600)
    assert (scored.status, scored.public_score) == ("complete", "0.5")
    assert no_sleep == [5.0, 10.0]  # after the 503, after "not listed yet"
