"""A stand-in Kaggle server on 127.0.0.1 that the REAL kaggle client talks to (tests only).

With `KAGGLE_API_ENVIRONMENT=LOCALHOST` the client addresses `http://localhost/api/v1/...`; with
`HTTP_PROXY=http://127.0.0.1:PORT` (and no NO_PROXY) it sends those requests, as absolute URLs, to this server,
which answers like Kaggle:

- POST /api/v1/competitions.CompetitionApiService/DownloadDataFiles -> 302 to /files/<name>.zip, then the zip
- POST .../StartSubmissionUpload -> {"token", "createUrl"}; PUT of the file to createUrl -> 200
- POST .../CreateSubmission -> {"message", "ref"}; POST .../GetSubmissionLimits -> the limits
- POST .../ListSubmissions -> submission SUBMISSION_REF as `submission_states` says, one state a call (the last
  repeats): PENDING, then COMPLETE with a public score or ERROR with Kaggle's message; then
  `other_submissions` as given (submissions made elsewhere)
- POST /api/v1/security.OAuthService/IntrospectToken -> the user of FAKE_TOKEN (KAGGLE_API_TOKEN sign-in)

API calls need the fake credentials (HTTP Basic FAKE_USERNAME:FAKE_KEY or Bearer FAKE_TOKEN), else 401.

Use from a test:

    with serve_competition({"dog-breed-identification": zip_bytes(files)}) as (port, requests):
        apply_kaggle_env(monkeypatch, kaggle_env(port, tmp_path))
        fetch_competition(source="kaggle", competition="dog-breed-identification", dest=tmp_path / "data/raw")
    assert requests[0].json() == {"competitionName": "dog-breed-identification"}

For a subprocess (dvc repro): `env=subprocess_env(kaggle_env(port, tmp_path))`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import threading
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

logger = logging.getLogger(__name__)

FAKE_USERNAME = "stand-in-user"
FAKE_KEY = "fake-kaggle-key-5f3e9b1c7d"
FAKE_TOKEN = "KGAT_fake-token-8d2e4b6a0c"
COMPETITION_SERVICE = "/api/v1/competitions.CompetitionApiService/"
INTROSPECT_PATH = "/api/v1/security.OAuthService/IntrospectToken"
MAX_BODY_BYTES = 64 << 20
SUBMISSION_REF = 4242
DEFAULT_LIMITS = {"numToday": 1, "numTotal": 3, "numAllowedNow": 4, "limitedByTotal": False}
# Variables that would steer the client elsewhere (proxies, real credentials, verbose header printing).
ENV_TO_UNSET = (
    "NO_PROXY",
    "no_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "XDG_CONFIG_HOME",
    "VERBOSE",
    "VERBOSE_OUTPUT",
)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str  # the URL's path, e.g. /api/v1/competitions.CompetitionApiService/DownloadDataFiles
    headers: dict[str, str]
    body: bytes

    @property
    def api_method(self) -> str:
        """The API method name for API calls (DownloadDataFiles), else ''."""
        return (
            self.path.removeprefix(COMPETITION_SERVICE) if self.path.startswith(COMPETITION_SERVICE) else ""
        )

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass(frozen=True)
class _Competitions:
    zip_bytes_by_name: Mapping[str, bytes]
    status_by_name: Mapping[str, int]
    submission_message: str
    submission_limits: Mapping[str, Any]
    submission_states: list[Mapping[str, Any]]
    other_submissions: list[Mapping[str, Any]]
    requests: list[RecordedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def serve_competition(
    zip_bytes_by_name: Mapping[str, bytes],
    *,
    status_by_name: Mapping[str, int] | None = None,
    submission_message: str = "Successfully submitted",
    submission_limits: Mapping[str, Any] | None = None,
    submission_states: Sequence[Mapping[str, Any]] = ({"status": "COMPLETE", "publicScore": "0.12345"},),
    other_submissions: Sequence[Mapping[str, Any]] = (),
    lifetime_s: float = 300.0,
) -> Iterator[tuple[int, list[RecordedRequest]]]:
    """Serve the competitions named in `zip_bytes_by_name`; yields (port, requests received so far).

    A name in `status_by_name` answers every API call about it with that HTTP status (403: rules not accepted);
    an unknown name answers 404. The server stops when the block ends, or after `lifetime_s` in any case.
    """
    competitions = _Competitions(
        zip_bytes_by_name=dict(zip_bytes_by_name),
        status_by_name=dict(status_by_name or {}),
        submission_message=submission_message,
        submission_limits=dict(submission_limits or DEFAULT_LIMITS),
        submission_states=[dict(state) for state in submission_states],
        other_submissions=[dict(other) for other in other_submissions],
    )
    handler = type("StandInKaggleHandler", (_Handler,), {"competitions": competitions})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    watchdog = threading.Timer(lifetime_s, server.shutdown)
    watchdog.daemon = True
    thread.start()
    watchdog.start()
    try:
        yield server.server_address[1], competitions.requests
    finally:
        watchdog.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def kaggle_env(port: int, tmp_path: Path, *, credentials: str = "key") -> dict[str, str]:
    """Environment that points the real client at the stand-in server, with a fresh HOME and config folder.

    credentials: "key" (KAGGLE_USERNAME/KAGGLE_KEY), "token" (KAGGLE_API_TOKEN), "file" (kaggle.json in
    KAGGLE_CONFIG_DIR) or "none".
    """
    home = tmp_path / "home"
    config_dir = tmp_path / "kaggle-config"
    home.mkdir(parents=True, exist_ok=True)
    config_dir.mkdir(parents=True, exist_ok=True)
    proxy = f"http://127.0.0.1:{port}"
    env = {
        "KAGGLE_API_ENVIRONMENT": "LOCALHOST",
        "HTTP_PROXY": proxy,
        "http_proxy": proxy,
        "HOME": str(home),
        "KAGGLE_CONFIG_DIR": str(config_dir),
    }
    if credentials == "key":
        env |= {"KAGGLE_USERNAME": FAKE_USERNAME, "KAGGLE_KEY": FAKE_KEY}
    elif credentials == "token":
        env |= {"KAGGLE_API_TOKEN": FAKE_TOKEN}
    elif credentials == "file":
        kaggle_json = config_dir / "kaggle.json"
        kaggle_json.write_text(json.dumps({"username": FAKE_USERNAME, "key": FAKE_KEY}))
        kaggle_json.chmod(0o600)
    elif credentials != "none":
        raise ValueError(f"credentials: expected key, token, file or none, found {credentials!r}")
    return env


def apply_kaggle_env(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str]) -> None:
    """Set `env` for this test, after removing every KAGGLE_* variable and proxy bypass of the real shell."""
    for name in list(os.environ):
        if name.startswith("KAGGLE_") or name in ENV_TO_UNSET:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def subprocess_env(env: Mapping[str, str]) -> dict[str, str]:
    """The current environment, cleaned as in apply_kaggle_env, with `env` on top: for subprocess.run(env=...)."""
    kept = {name: value for name, value in os.environ.items() if not name.startswith("KAGGLE_")}
    return {name: value for name, value in kept.items() if name not in ENV_TO_UNSET} | dict(env)


def assert_no_credentials(text: str) -> None:
    """Fail when `text` (logs, messages, output) holds any fake credential, raw or in its HTTP Basic form."""
    basic = base64.b64encode(f"{FAKE_USERNAME}:{FAKE_KEY}".encode()).decode()
    for secret in (FAKE_KEY, FAKE_TOKEN, basic):
        assert secret not in text, "a credential appears in the logs or messages"


def zip_bytes(files: Mapping[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip holding `files` (archive name -> content), in the given order."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


class _Handler(BaseHTTPRequestHandler):
    competitions: _Competitions  # set on the per-server subclass
    timeout = 10  # s, per socket read: a stuck client cannot hold a thread forever

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        logger.debug("stand-in kaggle: " + format, *args)

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def _handle(self) -> None:
        path = urlsplit(self.path).path
        body = self._read_body()
        with self.competitions.lock:
            self.competitions.requests.append(RecordedRequest(self.command, path, dict(self.headers), body))
        if path == INTROSPECT_PATH:
            token = json.loads(body or b"{}").get("token")
            answer = {"active": True, "username": FAKE_USERNAME} if token == FAKE_TOKEN else {"active": False}
            self._send_json(200, answer)
        elif path.startswith(COMPETITION_SERVICE):
            self._api_call(path.removeprefix(COMPETITION_SERVICE), json.loads(body or b"{}"))
        elif self.command == "GET" and path.startswith("/files/") and path.endswith(".zip"):
            self._send_file(path.removeprefix("/files/").removesuffix(".zip"))
        elif self.command == "PUT" and path.startswith("/upload/"):
            self._send_json(200, {})
        else:
            self._send_json(
                404, {"code": 404, "message": f"stand-in Kaggle: no route for {self.command} {path}"}
            )

    def _api_call(self, method: str, payload: dict[str, Any]) -> None:
        if not self._signed_in():
            self._send_json(401, {"code": 401, "message": "Unauthenticated"})
            return
        name = payload.get("competitionName", "")
        status = self.competitions.status_by_name.get(name)
        if status is not None:
            self._send_json(status, {"code": status, "message": f"stand-in Kaggle: HTTP {status} for {name}"})
        elif name not in self.competitions.zip_bytes_by_name:
            self._send_json(404, {"code": 404, "message": "Competition not found"})
        elif method == "DownloadDataFiles":
            self._send_redirect(f"http://localhost/files/{name}.zip")
        elif method == "StartSubmissionUpload":
            token = f"blob-token-{len(self.competitions.requests)}"
            self._send_json(200, {"token": token, "createUrl": f"http://localhost/upload/{token}"})
        elif method == "CreateSubmission":
            self._send_json(200, {"message": self.competitions.submission_message, "ref": SUBMISSION_REF})
        elif method == "GetSubmissionLimits":
            self._send_json(200, dict(self.competitions.submission_limits))
        elif method == "ListSubmissions":
            states = self.competitions.submission_states
            state = states.pop(0) if len(states) > 1 else states[0]
            listed = {"ref": SUBMISSION_REF, "description": "stand-in submission", **state}
            others = self.competitions.other_submissions
            self._send_json(200, {"submissions": [listed, *others], "nextPageToken": ""})
        else:
            self._send_json(404, {"code": 404, "message": f"stand-in Kaggle: no method {method}"})

    def _signed_in(self) -> bool:
        basic = base64.b64encode(f"{FAKE_USERNAME}:{FAKE_KEY}".encode()).decode()
        return self.headers.get("Authorization", "") in (f"Basic {basic}", f"Bearer {FAKE_TOKEN}")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise ValueError(f"request body of {length} bytes exceeds {MAX_BODY_BYTES}")
        return self.rfile.read(length)

    def _read_chunked(self) -> bytes:
        chunks = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                self.rfile.readline()
                return b"".join(chunks)
            chunks.append(self.rfile.read(size))
            self.rfile.readline()
            if sum(len(chunk) for chunk in chunks) > MAX_BODY_BYTES:
                raise ValueError(f"chunked request body exceeds {MAX_BODY_BYTES} bytes")

    def _send_json(self, status: int, payload: Mapping[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def _send_redirect(self, location: str) -> None:
        self._send(302, b"", {"Location": location})

    def _send_file(self, name: str) -> None:
        content = self.competitions.zip_bytes_by_name.get(name)
        if content is None:
            self._send_json(404, {"code": 404, "message": f"stand-in Kaggle: no file {name}.zip"})
            return
        self._send(200, content, {"Content-Type": "application/zip"})

    def _send(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
