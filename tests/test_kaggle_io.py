"""fetch_competition against the stand-in Kaggle server, driven through the real kaggle client, and local sources."""

from __future__ import annotations

import base64
import io
import logging
import os
import stat
import zipfile
from pathlib import Path

import pytest
from kaggle_server import (
    FAKE_KEY,
    FAKE_TOKEN,
    FAKE_USERNAME,
    apply_kaggle_env,
    assert_no_credentials,
    kaggle_env,
    serve_competition,
    zip_bytes,
)
from PIL import Image

from kagglecls.kaggle_io import KaggleError, fetch_competition

COMPETITION = "dog-breed-identification"
RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"


@pytest.fixture(autouse=True)
def credentials_never_shown(caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]):
    caplog.set_level(logging.DEBUG)
    yield
    captured = capsys.readouterr()
    assert_no_credentials(caplog.text + captured.out + captured.err)


def tiny_jpeg(color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), color).save(buffer, format="JPEG")
    return buffer.getvalue()


def dog_breed_files() -> dict[str, bytes]:
    """Dog Breed Identification's layout: labels.csv (id,breed), train/<id>.jpg, test/<id>.jpg, a sample."""
    labels = b"id,breed\n000bec1,boston_bull\n001513d,dingo\n001cdf0,pekinese\n00214f3,dingo\n"
    sample = b"id,boston_bull,dingo,pekinese\n00a3edd,0.333,0.333,0.334\n00a6892,0.333,0.333,0.334\n"
    files = {"labels.csv": labels, "sample_submission.csv": sample}
    for index, image_id in enumerate(["000bec1", "001513d", "001cdf0", "00214f3"]):
        files[f"train/{image_id}.jpg"] = tiny_jpeg((40 * index, 80, 120))
    for index, image_id in enumerate(["00a3edd", "00a6892"]):
        files[f"test/{image_id}.jpg"] = tiny_jpeg((200, 30 * index, 10))
    return files


def tree(folder: Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()
    }


def fetch_from_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, zips: dict[str, bytes], **server
) -> list:
    """fetch_competition(source="kaggle") into tmp_path/data/raw; returns the requests the server saw."""
    credentials = server.pop("credentials", "key")
    with serve_competition(zips, **server) as (port, requests):
        apply_kaggle_env(monkeypatch, kaggle_env(port, tmp_path, credentials=credentials))
        try:
            fetch_competition(source="kaggle", competition=COMPETITION, dest=tmp_path / "data" / "raw")
        finally:
            received = list(requests)
    return received


def symlink_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("labels.csv", b"id,breed\n")
        link = zipfile.ZipInfo("train/link.jpg")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        archive.writestr(link, "../../outside.jpg")
    return buffer.getvalue()


# ---- from Kaggle, through the real client ----


@pytest.mark.parametrize(
    ("credentials", "authorization"),
    [
        ("key", "Basic " + base64.b64encode(f"{FAKE_USERNAME}:{FAKE_KEY}".encode()).decode()),
        ("file", "Basic " + base64.b64encode(f"{FAKE_USERNAME}:{FAKE_KEY}".encode()).decode()),
        ("token", f"Bearer {FAKE_TOKEN}"),
    ],
    ids=["key", "kaggle.json", "token"],
)
def test_download_dog_breed_competition(tmp_path, monkeypatch, credentials, authorization):
    files = dog_breed_files()
    with_folder_entries = {"train/": b"", "test/": b""} | files  # Kaggle's zips list folders too
    requests = fetch_from_server(
        tmp_path, monkeypatch, {COMPETITION: zip_bytes(with_folder_entries)}, credentials=credentials
    )

    assert tree(tmp_path / "data" / "raw") == files
    assert os.listdir(tmp_path / "data") == ["raw"]
    download_calls = [request for request in requests if request.api_method == "DownloadDataFiles"]
    assert [request.json() for request in download_calls] == [{"competitionName": COMPETITION}]
    assert download_calls[0].headers["Authorization"] == authorization
    assert requests[-1].path == f"/files/{COMPETITION}.zip"


def test_download_shows_its_progress_on_stderr(tmp_path, monkeypatch, capsys):
    """The client runs quiet (its output is captured, for credentials' sake): our bar counts the bytes."""
    archive = zip_bytes(dog_breed_files())
    fetch_from_server(tmp_path, monkeypatch, {COMPETITION: archive})
    bar = capsys.readouterr().err.split("\r")[-1].strip()  # the bar's last state
    assert bar.startswith(f"download {COMPETITION}: {len(archive) / 1024:.2f}kB ") or bar.startswith(
        f"download {COMPETITION}: {len(archive) / 1024:.1f}kB "
    ), bar


def test_download_unpacks_nested_zips(tmp_path, monkeypatch):
    train_image, test_image = tiny_jpeg((1, 2, 3)), tiny_jpeg((4, 5, 6))
    outer = {
        "sample_submission.csv": b"id,label\n1,0.5\n",
        "train.zip": zip_bytes({"train/cat.1.jpg": train_image, "train/dog.2.jpg": train_image}),
        "test.zip": zip_bytes({"1.jpg": test_image}),  # files at the top: they go into test/
        "labels.csv.zip": zip_bytes({"labels.csv": b"id,label\ncat.1,cat\n"}),
    }
    fetch_from_server(tmp_path, monkeypatch, {COMPETITION: zip_bytes(outer)})

    assert tree(tmp_path / "data" / "raw") == {
        "sample_submission.csv": b"id,label\n1,0.5\n",
        "train/cat.1.jpg": train_image,
        "train/dog.2.jpg": train_image,
        "test/1.jpg": test_image,
        "labels.csv": b"id,label\ncat.1,cat\n",
    }
    assert os.listdir(tmp_path / "data") == ["raw"]


def test_download_class_folder_layout(tmp_path, monkeypatch):
    """Plant Seedlings' layout: train/<class>/<file>, test/<file>, a sample with a label column."""
    buffer = io.BytesIO()
    Image.new("RGB", (5, 5), (0, 120, 0)).save(buffer, format="PNG")
    files = {
        "sample_submission.csv": b"file,species\n0021e90e4.png,Black-grass\n",
        "train/Black-grass/0050f38b3.png": buffer.getvalue(),
        "train/Sugar beet/0183fdf68.PNG": buffer.getvalue(),
        "test/0021e90e4.png": buffer.getvalue(),
    }
    fetch_from_server(tmp_path, monkeypatch, {COMPETITION: zip_bytes(files)})
    assert tree(tmp_path / "data" / "raw") == files


def test_rules_not_accepted_names_the_rules_page(tmp_path, monkeypatch):
    with pytest.raises(KaggleError) as error:
        fetch_from_server(tmp_path, monkeypatch, {COMPETITION: b""}, status_by_name={COMPETITION: 403})

    assert "HTTP 403" in str(error.value)
    assert f"accept the competition rules at {RULES_URL}" in str(error.value)
    assert "\n" not in str(error.value)
    assert os.listdir(tmp_path / "data") == []
    assert_no_credentials(str(error.value))


def test_unknown_competition(tmp_path, monkeypatch):
    with pytest.raises(
        KaggleError, match=r"Kaggle has no competition 'dog-breed-identification' \(HTTP 404\)"
    ):
        fetch_from_server(tmp_path, monkeypatch, {"some-other-competition": b""})
    assert os.listdir(tmp_path / "data") == []


def test_missing_credentials_stop_before_any_request(tmp_path, monkeypatch):
    with serve_competition({COMPETITION: zip_bytes(dog_breed_files())}) as (port, requests):
        apply_kaggle_env(monkeypatch, kaggle_env(port, tmp_path, credentials="none"))
        with pytest.raises(KaggleError) as error:
            fetch_competition(source="kaggle", competition=COMPETITION, dest=tmp_path / "data" / "raw")

    message = str(error.value)
    assert message.startswith(
        "no Kaggle credentials found: create an API token at https://www.kaggle.com/settings"
    )
    assert "KAGGLE_API_TOKEN" in message and str(tmp_path / "kaggle-config") in message
    assert requests == []
    assert os.listdir(tmp_path / "data") == []


def test_wrong_key_is_rejected(tmp_path, monkeypatch):
    with serve_competition({COMPETITION: zip_bytes(dog_breed_files())}) as (port, _):
        apply_kaggle_env(monkeypatch, kaggle_env(port, tmp_path) | {"KAGGLE_KEY": "wrong-key-value-42"})
        with pytest.raises(KaggleError, match=r"Kaggle rejected the credentials \(HTTP 401\)") as error:
            fetch_competition(source="kaggle", competition=COMPETITION, dest=tmp_path / "data" / "raw")
    assert "wrong-key-value-42" not in str(error.value)
    assert os.listdir(tmp_path / "data") == []


def test_network_failure(tmp_path, monkeypatch):
    with serve_competition({}) as (closed_port, _):
        pass  # the server is gone: its port refuses connections
    apply_kaggle_env(monkeypatch, kaggle_env(closed_port, tmp_path))
    with pytest.raises(
        KaggleError, match=r"^cannot reach Kaggle to download competition 'dog-breed-identification'"
    ):
        fetch_competition(source="kaggle", competition=COMPETITION, dest=tmp_path / "data" / "raw")
    assert os.listdir(tmp_path / "data") == []


def test_truncated_download_is_refused(tmp_path, monkeypatch):
    whole = zip_bytes(dog_breed_files())
    with pytest.raises(KaggleError) as error:
        fetch_from_server(tmp_path, monkeypatch, {COMPETITION: whole[: len(whole) // 2]})

    assert str(error.value).startswith(f"{COMPETITION}.zip downloaded from Kaggle: corrupt or truncated zip")
    assert os.listdir(tmp_path / "data") == []


def test_zip_slip_download_is_refused(tmp_path, monkeypatch):
    with pytest.raises(
        KaggleError, match=r"entry '\.\./evil\.txt' is a path with '\.\.'; refusing to extract"
    ):
        fetch_from_server(
            tmp_path, monkeypatch, {COMPETITION: zip_bytes({"a.csv": b"x", "../evil.txt": b"pwn"})}
        )
    assert os.listdir(tmp_path / "data") == []
    assert not (tmp_path / "evil.txt").exists()


def test_failed_download_keeps_the_previous_dest(tmp_path, monkeypatch):
    previous = tmp_path / "data" / "raw"
    previous.mkdir(parents=True)
    (previous / "old.csv").write_text("kept")
    with pytest.raises(KaggleError):
        fetch_from_server(tmp_path, monkeypatch, {COMPETITION: b""}, status_by_name={COMPETITION: 403})
    assert tree(previous) == {"old.csv": b"kept"}
    assert os.listdir(tmp_path / "data") == ["raw"]

    fetch_from_server(tmp_path, monkeypatch, {COMPETITION: zip_bytes(dog_breed_files())})
    assert tree(previous) == dog_breed_files()
    assert os.listdir(tmp_path / "data") == ["raw"]


# ---- local sources ----


def test_local_zip_source(tmp_path):
    source = tmp_path / "downloads" / f"{COMPETITION}.zip"
    source.parent.mkdir()
    source.write_bytes(zip_bytes(dog_breed_files()))
    fetch_competition(source=str(source), competition=COMPETITION, dest=tmp_path / "data" / "raw")
    assert tree(tmp_path / "data" / "raw") == dog_breed_files()
    assert os.listdir(tmp_path / "data") == ["raw"]


def test_local_folder_source_with_a_nested_zip(tmp_path):
    files = dog_breed_files()
    source = tmp_path / "by-hand"
    for name, content in files.items():
        if not name.startswith("train/"):
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes(content)
    train = {name: content for name, content in files.items() if name.startswith("train/")}
    (source / "train.zip").write_bytes(zip_bytes(train))
    source_before = tree(source)

    fetch_competition(source=str(source), competition=COMPETITION, dest=tmp_path / "data" / "raw")

    assert tree(tmp_path / "data" / "raw") == files
    assert tree(source) == source_before  # copied, the user's folder untouched
    assert os.listdir(tmp_path / "data") == ["raw"]


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("../evil.txt", "a path with '..'"),
        ("train/../../evil.txt", "a path with '..'"),
        ("ABSOLUTE", "an absolute path"),
    ],
)
def test_zip_slip_entries_are_refused(tmp_path, entry, reason):
    entry = str(tmp_path / "evil.txt") if entry == "ABSOLUTE" else entry
    source = tmp_path / "downloads" / "competition.zip"
    source.parent.mkdir()
    source.write_bytes(zip_bytes({"labels.csv": b"id,breed\n", entry: b"pwned"}))

    with pytest.raises(KaggleError) as error:
        fetch_competition(source=str(source), competition=COMPETITION, dest=tmp_path / "data" / "raw")

    assert str(error.value) == (
        f"{source}: entry {entry!r} is {reason}; refusing to extract it (zip-slip), the zip is unsafe"
    )
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "data" / "evil.txt").exists()
    assert os.listdir(tmp_path / "data") == []


def test_symlink_entry_is_refused(tmp_path):
    source = tmp_path / "competition.zip"
    source.write_bytes(symlink_zip())
    with pytest.raises(KaggleError, match=r"entry 'train/link\.jpg' is a symbolic link; refusing to extract"):
        fetch_competition(source=str(source), competition=COMPETITION, dest=tmp_path / "data" / "raw")
    assert os.listdir(tmp_path / "data") == []


def test_crc_error_is_found_before_extraction(tmp_path):
    good = zip_bytes({"labels.csv": b"id,breed\n", "train/a.jpg": b"A" * 100}, compression=zipfile.ZIP_STORED)
    source = tmp_path / "competition.zip"
    source.write_bytes(good.replace(b"A" * 100, b"A" * 50 + b"B" + b"A" * 49))
    with pytest.raises(KaggleError, match=r"competition\.zip: entry 'train/a\.jpg' fails its CRC check"):
        fetch_competition(source=str(source), competition=COMPETITION, dest=tmp_path / "data" / "raw")
    assert os.listdir(tmp_path / "data") == []


def test_failure_half_way_through_leaves_nothing(tmp_path):
    # labels.csv.zip unpacks onto the labels.csv already extracted from the outer zip.
    outer = {"labels.csv": b"id,breed\n", "labels.csv.zip": zip_bytes({"labels.csv": b"id,breed\nx,y\n"})}
    source = tmp_path / "competition.zip"
    source.write_bytes(zip_bytes(outer))
    with pytest.raises(KaggleError, match=r"labels\.csv\.zip: entry 'labels\.csv' collides with a file"):
        fetch_competition(source=str(source), competition=COMPETITION, dest=tmp_path / "data" / "raw")
    assert os.listdir(tmp_path / "data") == []


def test_missing_local_source(tmp_path):
    with pytest.raises(
        KaggleError, match=r"no such file or folder; expected 'kaggle', a competition zip or folder"
    ):
        fetch_competition(
            source=str(tmp_path / "nowhere.zip"), competition=COMPETITION, dest=tmp_path / "data" / "raw"
        )
    assert os.listdir(tmp_path / "data") == []


def test_source_inside_dest_is_refused(tmp_path):
    dest = tmp_path / "data" / "raw"
    dest.mkdir(parents=True)
    (dest / "competition.zip").write_bytes(zip_bytes(dog_breed_files()))
    with pytest.raises(KaggleError, match=r"lies inside .*raw, which is replaced: move it elsewhere"):
        fetch_competition(source=str(dest / "competition.zip"), competition=COMPETITION, dest=dest)
    assert os.listdir(dest) == ["competition.zip"]
    assert os.listdir(tmp_path / "data") == ["raw"]
