"""Stage download and Kaggle I/O: the competition from Kaggle, a local zip or folder, or the embedded sample,
extracted and moved into place whole; and submitting. Credentials never reach messages or logs."""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import requests
from tqdm import tqdm

from kagglecls.atomic import building_folder
from kagglecls.competition import build_sample_competition
from kagglecls.errors import UserError
from kagglecls.params import Params

logger = logging.getLogger(__name__)

SETTINGS_URL = "https://www.kaggle.com/settings"
# Zips inside zips are unpacked this many levels deep at most, a guard against zip bombs.
MAX_NESTED_ZIP_DEPTH = 3
COPY_BUFFER_BYTES = 1 << 20
# Environment variables whose values are credentials (KAGGLE_API_TOKEN may also be a path to a token file).
SECRET_VARIABLES = ("KAGGLE_KEY", "KAGGLE_API_TOKEN")


class KaggleError(UserError):
    """A failure the user can fix; str() is one line saying what happened and what to do."""


def download(*, params: Params, dest: Path) -> None:
    """data/raw: the competition as Kaggle ships it (or the embedded sample built in the same layout)."""
    data = params.data
    if data.source == "sample":
        build_sample_competition(dest, **asdict(data.sample), seed=params.base.seed)
    else:
        fetch_competition(source=data.source, competition=data.competition, dest=dest)
    logger.info("download: competition in %s", dest)


def fetch_competition(*, source: str, competition: str, dest: Path) -> None:
    """Put `competition` into `dest`, extracted, from Kaggle (`source="kaggle"`) or a local zip or folder."""
    dest = Path(dest)
    with building_folder(dest) as staged:
        if source == "kaggle":
            with tempfile.TemporaryDirectory(prefix=f".{dest.name}.download-", dir=dest.parent) as folder:
                archive = _download(competition=competition, folder=Path(folder))
                label = f"{archive.name} downloaded from Kaggle"
                _extract_zip(archive, staged, label=label)
        else:
            label = str(source)
            _stage_local(Path(source), staged, dest=dest)
        _unpack_nested_zips(staged, label=label)
    logger.info("competition %s from %s is in %s", competition, source, dest)


@dataclass(frozen=True)
class Uploaded:
    message: str  # the server's
    ref: int  # the submission's id at Kaggle


@dataclass(frozen=True)
class Scored:
    """One submission as Kaggle lists it."""

    ref: int
    status: str  # pending | complete | error
    public_score: str | None = None
    error: str | None = None  # Kaggle's description of a scoring error
    description: str = ""


class ScoreWaitTimeout(KaggleError):
    """Kaggle had not scored the submission when the wait's bound ran out."""


class KaggleUnavailable(KaggleError):
    """No answer, rate limiting or a server error: worth asking again later."""


def submit(*, submission_csv: Path, competition: str, message: str) -> Uploaded:
    """Upload `submission_csv` (submit.main has read and validated it) to `competition` with the kaggle
    client."""
    api = _authenticated_api()
    with _client_output(api), _client_errors(api, competition=competition, action="submit to"):
        _check_submission_limits(api, competition=competition)
        response = api.competition_submit(str(submission_csv), message, competition, quiet=True)
    if response.message == api.COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE:
        raise KaggleError(f"upload of {submission_csv} to competition {competition!r} failed; submit again")
    logger.info(
        "submitted %s to %s: %s (ref %s)", submission_csv, competition, response.message, response.ref
    )
    return Uploaded(message=response.message, ref=int(response.ref))


def list_submissions(*, competition: str) -> list[Scored]:
    """This account's latest submissions to `competition` (the client's first page, newest first)."""
    api = _authenticated_api()
    with _client_output(api), _client_errors(api, competition=competition, action="list submissions of"):
        answer = api.competition_submissions(competition) or []
    return [
        Scored(
            ref=int(item.ref),
            status=item.status.name.lower(),
            public_score=item.public_score or None,
            error=item.error_description or None,
            description=item.description or "",
        )
        for item in answer
        if item is not None
    ]


def wait_for_score(
    *,
    competition: str,
    ref: int,
    timeout_s: float,
    first_delay_s: float = 5.0,
    max_delay_s: float = 60.0,
) -> Scored:
    """Ask Kaggle about submission `ref` until it is scored (or failed), waiting first_delay_s, then twice as
    long each time up to max_delay_s; ScoreWaitTimeout once `timeout_s` would be passed."""
    deadline, delay = _now() + timeout_s, first_delay_s
    while True:
        try:
            listed = list_submissions(competition=competition)
        except KaggleUnavailable as error:  # a bad minute at Kaggle's end does not end the wait
            logger.warning("%s", error)
            listed = []
        scored = next((item for item in listed if item.ref == ref), None)
        if scored is not None and scored.status != "pending":
            return scored
        if _now() + delay > deadline:
            raise ScoreWaitTimeout(
                f"Kaggle had not scored submission {ref} after {timeout_s:.0f} s; it stays uploaded: "
                "`kagglecls submissions` shows its score once Kaggle has it"
            )
        state = scored.status if scored else "not listed yet"
        logger.info("submission %d: %s; asking again in %.0f s", ref, state, delay)
        _pause(delay)
        delay = min(2 * delay, max_delay_s)


def _now() -> float:
    return time.monotonic()


def _pause(seconds: float) -> None:
    time.sleep(seconds)


# ---- the kaggle client ----


def _download(*, competition: str, folder: Path) -> Path:
    api = _authenticated_api()
    progress = _download_progress(folder, description=f"download {competition}")
    with progress, _client_output(api), _client_errors(api, competition=competition, action="download"):
        try:
            api.competition_download_files(competition, path=str(folder), force=True, quiet=True)
        except ValueError as error:  # the client's check of the size it received against Content-Length
            raise KaggleError(
                f"download of competition {competition!r} was cut short ({error}); run again"
            ) from None
    archives = sorted(folder.glob("*.zip"))
    if len(archives) != 1:  # `folder` is the temporary folder fetch_competition made
        found = ", ".join(path.name for path in sorted(folder.iterdir())) or "nothing"
        raise KaggleError(f"Kaggle sent no single zip for competition {competition!r} (found {found})")
    return archives[0]


@contextlib.contextmanager
def _download_progress(folder: Path, *, description: str, every: float = 1.0) -> Iterator[None]:
    """A progress bar (bytes so far, rate) of the files growing in `folder`: the client itself runs quiet,
    its output captured to keep credentials out of logs. The bar is made before that capture starts."""
    bar = tqdm(desc=description, unit="B", unit_scale=True, unit_divisor=1024, mininterval=every)
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(every):
            bar.update(_bytes_in(folder) - bar.n)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        bar.update(_bytes_in(folder) - bar.n)
        bar.close()


def _bytes_in(folder: Path) -> int:
    total = 0
    for path in folder.iterdir():
        with contextlib.suppress(OSError):  # a file the client renames or removes meanwhile
            total += path.stat().st_size
    return total


def _authenticated_api() -> Any:
    with _client_output(None):  # importing the client authenticates and prints help without credentials
        from kaggle.api.kaggle_api_extended import KaggleApi
    api = KaggleApi()
    # The client reads these once, at import: this call's environment counts. No "--verbose": it prints the key.
    api.config_dir = _client_config_dir()
    api.config = os.path.join(api.config_dir, api.config_file)
    api.args = ["--local"] if os.environ.get("KAGGLE_API_ENVIRONMENT") == "LOCALHOST" else []
    try:
        with _client_output(api), _client_errors(api, competition=None, action="check the credentials"):
            api.authenticate()
    except SystemExit:  # the client's authenticate() exits when it finds no credentials
        raise KaggleError(
            "no Kaggle credentials found: create an API token at "
            f"{SETTINGS_URL} and set KAGGLE_API_TOKEN (or KAGGLE_USERNAME and KAGGLE_KEY), "
            f"or save kaggle.json in {api.config_dir}"
        ) from None
    return api


def _client_config_dir() -> str:
    """Where the kaggle client looks for kaggle.json (the same rule as KaggleApi.config_dir)."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return os.environ["KAGGLE_CONFIG_DIR"]
    home = os.path.expanduser("~")
    config_dir = os.path.join(home, ".kaggle")
    if sys.platform.startswith("linux") and not os.path.exists(config_dir):
        config_dir = os.path.join(
            os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config"), "kaggle"
        )
    return config_dir


def _check_submission_limits(api: Any, *, competition: str) -> None:
    limits = api.competition_get_submission_limits(competition)
    # All counts are zero for a user who has not joined yet: the first submission creates the team.
    has_submitted = limits.num_today > 0 or limits.num_total > 0
    if has_submitted and limits.num_allowed_now <= 0:
        scope = "in total" if limits.limited_by_total else "today"
        raise KaggleError(
            f"no submissions left {scope} for competition {competition!r} "
            f"({limits.num_today} made today, {limits.num_total} in total); try again after the limit resets"
        )
    logger.info("submissions left today for %s: %d", competition, limits.num_allowed_now)


@contextlib.contextmanager
def _client_errors(api: Any, *, competition: str | None, action: str) -> Iterator[None]:
    """Turn the client's HTTP and network exceptions into one-line KaggleErrors without credentials."""
    task = f"{action} competition {competition!r}" if competition else action
    try:
        yield
    except requests.HTTPError as error:
        status = error.response.status_code if error.response is not None else None
        kind = KaggleUnavailable if status is not None and (status == 429 or status >= 500) else KaggleError
        raise kind(_redact(_http_message(error, competition=competition or "", task=task), api)) from None
    except (requests.ConnectionError, requests.Timeout) as error:
        # str(error) is left out: it can hold a proxy URL with a password in it.
        raise KaggleUnavailable(
            f"cannot reach Kaggle to {task} ({type(error).__name__}); "
            "check the network connection and any proxy settings, then run again"
        ) from None
    except requests.RequestException as error:
        raise KaggleError(f"request to Kaggle to {task} failed ({type(error).__name__}); run again") from None


def _http_message(error: Any, *, competition: str, task: str) -> str:
    status = error.response.status_code if error.response is not None else None
    page = f"https://www.kaggle.com/competitions/{competition}"
    if status == 401:
        return f"Kaggle rejected the credentials (HTTP 401): create a new API token at {SETTINGS_URL}"
    if status == 403:
        return (
            f"Kaggle refused to {task} (HTTP 403): accept the competition "
            f"rules at {page}/rules while signed in as the account of these credentials, then run again"
        )
    if status == 404:
        return (
            f"Kaggle has no competition {competition!r} (HTTP 404): check the competition name, the last "
            f"part of its URL {page}"
        )
    if status == 429:
        return "Kaggle is rate-limiting this account (HTTP 429); wait a few minutes, then run again"
    said = " ".join(str(error).split())[:200]
    return f"Kaggle answered HTTP {status} when asked to {task} ({said}); try again later"


@contextlib.contextmanager
def _client_output(api: Any) -> Iterator[None]:
    """The client prints to stdout and stderr: send that to the debug log, credentials removed."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                logger.debug("kaggle client: %s", _redact(line, api))


def _redact(text: str, api: Any) -> str:
    for secret in _secrets(api):
        text = text.replace(secret, "***")
    return text


def _secrets(api: Any) -> list[str]:
    config = dict(getattr(api, "config_values", None) or {})
    values = {os.environ.get(name, "") for name in SECRET_VARIABLES}
    values |= {str(config.get("key") or ""), str(config.get("token") or "")}
    username = config.get("username") or os.environ.get("KAGGLE_USERNAME")
    key = config.get("key") or os.environ.get("KAGGLE_KEY")
    if username and key:  # the HTTP Basic form of the key
        values.add(base64.b64encode(f"{username}:{key}".encode()).decode())
    return sorted((value for value in values if len(value) >= 4), key=len, reverse=True)


# ---- local sources, zips, moving into place ----


def _stage_local(source: Path, staged: Path, *, dest: Path) -> None:
    if not source.exists():
        raise KaggleError(
            f"data source {str(source)!r}: no such file or folder; expected 'kaggle', a competition zip or folder"
        )
    if source.resolve().is_relative_to(dest.resolve()):
        raise KaggleError(f"data source {source} lies inside {dest}, which is replaced: move it elsewhere")
    if source.is_file():
        _extract_zip(source, staged, label=str(source))
        return
    try:
        shutil.copytree(source, staged, dirs_exist_ok=True)
    except (OSError, shutil.Error) as error:
        raise KaggleError(
            f"cannot copy {source} into {dest.parent}: {str(error).splitlines()[0][:300]}"
        ) from None


def _extract_zip(path: Path, target: Path, *, label: str) -> None:
    with _checked_zip(path, label=label) as archive:
        _write_members(archive, target, label=label)


@contextlib.contextmanager
def _checked_zip(path: Path, *, label: str) -> Iterator[zipfile.ZipFile]:
    """Open a zip whose every entry has a safe name and a good CRC; a bad zip is a KaggleError naming it."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                _check_member(info, label=label)
            bad_member = archive.testzip()  # reads every entry and checks its CRC-32
            if bad_member is not None:
                raise KaggleError(f"{label}: entry {bad_member!r} fails its CRC check; the zip is corrupt")
            yield archive
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise KaggleError(f"{label}: corrupt or truncated zip ({error}); download it again") from None


def _check_member(info: zipfile.ZipInfo, *, label: str) -> None:
    name = info.filename
    file_type = stat.S_IFMT(info.external_attr >> 16)  # unix mode in the high bits; 0 when not recorded
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive or PurePosixPath(name).is_absolute():
        reason = "an absolute path"
    elif ".." in name.replace("\\", "/").split("/"):
        reason = "a path with '..'"
    elif stat.S_ISLNK(info.external_attr >> 16):
        reason = "a symbolic link"
    elif file_type not in (0, stat.S_IFREG, stat.S_IFDIR):
        reason = "a special file"
    else:
        return
    raise KaggleError(
        f"{label}: entry {name!r} is {reason}; refusing to extract it (zip-slip), the zip is unsafe"
    )


def _write_members(archive: zipfile.ZipFile, target: Path, *, label: str) -> None:
    target.mkdir(parents=True, exist_ok=True)
    root = target.resolve()
    for info in tqdm(
        archive.infolist(), desc=f"unzip {Path(label).name}", unit="file", disable=None, leave=False
    ):
        path = root.joinpath(*info.filename.replace("\\", "/").split("/"))
        if not path.resolve().is_relative_to(root):
            raise KaggleError(
                f"{label}: entry {info.filename!r} lands outside {target.name}; refusing to extract"
            )
        try:
            if info.is_dir():
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, open(path, "xb") as out:
                shutil.copyfileobj(source, out, COPY_BUFFER_BYTES)
        except (FileExistsError, NotADirectoryError):
            raise KaggleError(
                f"{label}: entry {info.filename!r} collides with a file or folder already extracted"
            ) from None
        except OSError as error:  # e.g. the disk is full
            raise KaggleError(f"{label}: cannot write entry {info.filename!r}: {error.strerror}") from None


def _unpack_nested_zips(root: Path, *, label: str) -> None:
    """Unpack every zip under `root` in place (train.zip -> train/, labels.csv.zip -> labels.csv)."""
    for depth in range(MAX_NESTED_ZIP_DEPTH + 1):
        inner_zips = sorted(
            path for path in root.rglob("*") if path.suffix.lower() == ".zip" and path.is_file()
        )
        if not inner_zips:
            return
        if depth == MAX_NESTED_ZIP_DEPTH:
            raise KaggleError(
                f"{label}: zips nested more than {MAX_NESTED_ZIP_DEPTH} deep; refusing to unpack"
            )
        for inner in inner_zips:
            inner_label = f"{label}: {inner.relative_to(root).as_posix()}"
            stem = inner.name[: -len(".zip")]
            with _checked_zip(inner, label=inner_label) as archive:
                top_names = {info.filename.replace("\\", "/").split("/")[0] for info in archive.infolist()}
                # An inner zip holding its own name (train.zip: train/...) unpacks beside it, others into stem/.
                target = inner.parent if top_names == {stem} else inner.parent / stem
                _write_members(archive, target, label=inner_label)
            inner.unlink()
