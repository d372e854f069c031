"""Decoding, checking and pre-resizing images, on small files generated in tmp_path."""

import csv
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from kagglecls import atomic, images
from kagglecls.images import (
    BadImageError,
    ImageCheck,
    check_images,
    load_rgb,
    write_bad_image_report,
    write_resized_cache,
)


def _smooth_rgb(width: int, height: int, *, seed: int = 0) -> Image.Image:
    """Photo-like content: a coarse random grid blown up with a smooth filter."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 50 + 2, width // 50 + 2, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def _jpeg(path: Path, width: int = 64, height: int = 48, **save_options) -> Path:
    _smooth_rgb(width, height).save(path, format="JPEG", quality=90, **save_options)
    return path


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but holds no pixels: opening it is cheap."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _stored(path: Path) -> tuple[str, str, tuple[int, int]]:
    """Format, mode and size as stored in the file, read without keeping it open."""
    with Image.open(path) as image:
        return image.format, image.mode, image.size


def _open_file_count() -> int:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("counting open files needs Linux's /proc")
    return len(list(Path("/proc/self/fd").iterdir()))


def _pixel(image: Image.Image, x: int, y: int) -> tuple[int, ...]:
    return tuple(int(value) for value in image.getpixel((x, y)))


def _close(actual: tuple[int, ...], expected: tuple[int, ...], tolerance: int) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


# Unreadable files


def test_truncated_jpeg_is_refused_naming_the_file(tmp_path):
    whole = _jpeg(tmp_path / "whole.jpg", 200, 150).read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(whole[: len(whole) * 6 // 10])
    with pytest.raises(BadImageError) as raised:
        load_rgb(path)
    assert str(raised.value).startswith(f"{path}: cannot decode JPEG image: image file is truncated")


def test_jpeg_cut_inside_its_header_is_refused(tmp_path):
    path = tmp_path / "header.jpg"
    path.write_bytes(_jpeg(tmp_path / "whole.jpg").read_bytes()[:100])
    with pytest.raises(BadImageError, match="cannot decode the image header"):
        load_rgb(path)


def test_truncated_png_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BadImageError, match=r"cut\.png: cannot decode PNG image: image file is truncated"):
        load_rgb(path)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(BadImageError) as raised:
        load_rgb(path)
    assert str(raised.value) == f"{path}: empty file (0 bytes), expected an image"


def test_text_file_named_jpg_is_refused_showing_its_first_bytes(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello, this is not an image")
    with pytest.raises(BadImageError) as raised:
        load_rgb(path)
    assert str(raised.value) == f"{path}: not a recognised image format (starts with b'hello, t')"


def test_missing_file_is_refused(tmp_path):
    path = tmp_path / "missing.jpg"
    with pytest.raises(BadImageError) as raised:
        load_rgb(path)
    assert str(raised.value) == f"{path}: cannot read file (No such file or directory)"


def test_image_above_max_pixels_is_refused_without_decoding_or_warning(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header_only(12_000, 11_000))  # 132 Mpx: above MAX_PIXELS, below Pillow's error
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning must not escape
        with pytest.raises(BadImageError) as raised:
            load_rgb(path)
    assert str(raised.value) == (
        f"{path}: 12000 x 11000 = 132,000,000 pixels, more than the limit of 120,000,000"
        " (refused as a possible decompression bomb)"
    )


def test_image_above_pillows_own_limit_is_refused(tmp_path):
    path = tmp_path / "bomb.jpg"  # PNG bytes under a .jpg name, like a hostile upload
    path.write_bytes(_png_header_only(30_000, 30_000))
    with pytest.raises(BadImageError, match=r"bomb\.jpg: refused as a possible decompression bomb"):
        load_rgb(path)


def test_max_pixels_limit_applies_to_real_images(tmp_path, monkeypatch):
    path = _jpeg(tmp_path / "photo.jpg", 20, 10)
    monkeypatch.setattr(images, "MAX_PIXELS", 199)
    with pytest.raises(BadImageError, match="20 x 10 = 200 pixels, more than the limit of 199"):
        load_rgb(path)
    monkeypatch.setattr(images, "MAX_PIXELS", 200)
    assert load_rgb(path).size == (20, 10)


# Readable files in every mode end as RGB


def test_grayscale_jpeg_becomes_gray_rgb(tmp_path):
    path = tmp_path / "gray.jpg"
    Image.new("L", (16, 8), 100).save(path, quality=95)
    image = load_rgb(path)
    assert (image.mode, image.size) == ("RGB", (16, 8))
    assert _close(_pixel(image, 3, 3), (100, 100, 100), tolerance=1)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 8), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert _stored(path)[1] == "CMYK"
    image = load_rgb(path)
    assert image.mode == "RGB"
    assert _close(_pixel(image, 8, 4), (255, 0, 0), tolerance=3)


def test_palette_png_becomes_its_palette_colours(tmp_path):
    path = tmp_path / "palette.png"
    palette_image = Image.new("P", (4, 2), 1)
    palette_image.putpalette([0, 0, 0, 10, 200, 30])
    palette_image.putpixel((0, 0), 0)
    palette_image.save(path)
    image = load_rgb(path)
    assert image.mode == "RGB"
    assert _pixel(image, 0, 0) == (0, 0, 0)
    assert _pixel(image, 3, 1) == (10, 200, 30)
    palette_image.save(tmp_path / "transparent.png", transparency=0)  # index 0 is transparent: white
    assert _pixel(load_rgb(tmp_path / "transparent.png"), 0, 0) == (255, 255, 255)


def test_rgba_png_is_composited_on_white(tmp_path):
    path = tmp_path / "alpha.png"
    rgba = Image.new("RGBA", (3, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent: white
    rgba.putpixel((1, 0), (0, 0, 255, 255))  # opaque: unchanged
    rgba.putpixel((2, 0), (0, 0, 0, 128))  # half transparent black: mid grey
    rgba.save(path)
    image = load_rgb(path)
    assert image.mode == "RGB"
    assert _pixel(image, 0, 0) == (255, 255, 255)
    assert _pixel(image, 1, 0) == (0, 0, 255)
    assert _close(_pixel(image, 2, 0), (127, 127, 127), tolerance=1)


def test_gray_png_with_alpha_is_composited_on_white(tmp_path):
    path = tmp_path / "gray_alpha.png"
    Image.merge("LA", [Image.new("L", (2, 1), 0), Image.frombytes("L", (2, 1), bytes([0, 255]))]).save(path)
    image = load_rgb(path)
    assert [_pixel(image, x, 0) for x in range(2)] == [(255, 255, 255), (0, 0, 0)]


def test_16_bit_gray_png_is_scaled_to_8_bits(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 65535, 32896, 257]], dtype=np.uint16)).save(path)
    assert _stored(path)[1] == "I;16"
    image = load_rgb(path)
    assert [_pixel(image, x, 0) for x in range(4)] == [(0, 0, 0), (255, 255, 255), (128, 128, 128), (1, 1, 1)]


def test_png_bytes_under_a_jpg_name_are_decoded(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    Image.new("RGB", (5, 3), (1, 2, 3)).save(path, format="PNG")
    image = load_rgb(path)
    assert (image.size, _pixel(image, 4, 2)) == ((5, 3), (1, 2, 3))


def test_exif_orientation_6_is_applied(tmp_path):
    # Stored 40 wide x 20 high, left half red, right half blue; orientation 6 = turn 90 degrees clockwise.
    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rotated.jpg"
    stored.save(path, quality=95, exif=exif)
    image = load_rgb(path)
    assert image.size == (20, 40)
    assert _close(_pixel(image, 10, 5), (255, 0, 0), tolerance=10)  # the left half is now on top
    assert _close(_pixel(image, 10, 35), (0, 0, 255), tolerance=10)
    assert load_rgb(path, short_side=10).size == (10, 20)


def test_multi_frame_files_give_their_first_frame_and_are_closed(tmp_path):
    tiff = tmp_path / "pages.tiff"
    frames = [Image.new("RGB", (6, 4), colour) for colour in ((10, 20, 30), (200, 100, 0))]
    frames[0].save(tiff, save_all=True, append_images=frames[1:])
    gif = tmp_path / "animated.gif"
    frames[1].save(gif, save_all=True, append_images=frames[:1])
    open_files = _open_file_count()
    first_pages = [load_rgb(tiff), load_rgb(gif)]
    assert _open_file_count() == open_files  # the images are kept, their files are not
    assert _pixel(first_pages[0], 5, 3) == (10, 20, 30)
    assert _close(_pixel(first_pages[1], 0, 0), (200, 100, 0), tolerance=8)


def test_one_pixel_image(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (9, 8, 7)).save(path)
    assert _pixel(load_rgb(path), 0, 0) == (9, 8, 7)
    assert load_rgb(path, short_side=4).size == (4, 4)


# Resizing


@pytest.mark.parametrize(
    ("size", "short_side", "expected"),
    [
        ((500, 375), 96, (128, 96)),
        ((375, 500), 96, (96, 128)),
        ((500, 375), 288, (384, 288)),
        ((10, 30), 20, (20, 60)),
    ],
)
def test_short_side_resize_keeps_the_aspect(tmp_path, size, short_side, expected):
    path = tmp_path / "photo.png"
    _smooth_rgb(*size).save(path)
    assert load_rgb(path, short_side=short_side).size == expected


def test_draft_mode_result_is_close_to_a_full_decode_and_resize(tmp_path, monkeypatch):
    path = _jpeg(tmp_path / "large.jpg", 2000, 1500)
    drafts = []
    original_draft = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, size):
        drafts.append((mode, size))
        return original_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    fast = load_rgb(path, short_side=288)
    with Image.open(path) as stored:
        reference = stored.convert("RGB").resize((384, 288), Image.Resampling.LANCZOS)
    assert drafts == [("RGB", (384, 288))]  # libjpeg decodes at 1/4 scale: 500 x 375
    assert fast.size == (384, 288)
    difference = np.abs(np.asarray(fast, dtype=np.float32) - np.asarray(reference, dtype=np.float32))
    assert difference.mean() < 1.5


def test_no_draft_when_the_file_is_less_than_twice_the_target(tmp_path, monkeypatch):
    path = _jpeg(tmp_path / "photo.jpg", 500, 375)
    drafts = []
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, mode, size: drafts.append(size))
    assert load_rgb(path, short_side=288).size == (384, 288)
    assert drafts == []


# Checking many files


def test_check_images_keeps_the_order_and_reports_errors(tmp_path):
    good = _jpeg(tmp_path / "good.jpg", 64, 48)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _smooth_rgb(30, 10).save(rotated, exif=exif)
    text = tmp_path / "text.jpg"
    text.write_text("not an image")
    paths = [good, empty, rotated, text, good]
    checks = check_images(paths, workers=2)
    assert checks == [
        ImageCheck(path=good, width=64, height=48, error=None),
        ImageCheck(
            path=empty, width=None, height=None, error=f"{empty}: empty file (0 bytes), expected an image"
        ),
        ImageCheck(path=rotated, width=10, height=30, error=None),
        ImageCheck(
            path=text,
            width=None,
            height=None,
            error=f"{text}: not a recognised image format (starts with b'not an i')",
        ),
        ImageCheck(path=good, width=64, height=48, error=None),
    ]
    assert check_images(paths, workers=1) == checks
    assert check_images([], workers=2) == []


# The resized cache


def test_write_resized_cache(tmp_path):
    sources = [
        _jpeg(tmp_path / "large.jpg", 500, 375),
        tmp_path / "small.png",
        tmp_path / "text.jpg",
        _jpeg(tmp_path / "done.jpg"),
        tmp_path / "cmyk.jpg",
    ]
    _smooth_rgb(50, 40).save(sources[1])
    sources[2].write_text("not an image")
    Image.new("CMYK", (200, 100), (0, 255, 255, 0)).save(sources[4])
    cache = tmp_path / "cache"
    targets = [
        cache / "a" / "large.jpg",
        cache / "b" / "small.jpg",
        cache / "a" / "text.jpg",
        cache / "done.jpg",
    ]
    targets.append(cache / "b" / "cmyk.jpg")
    targets[3].parent.mkdir(parents=True)
    targets[3].write_bytes(b"built by an earlier run")
    stale = cache / f".done.jpg.999{atomic.TEMPORARY_MARK}.jpg"
    stale.write_bytes(b"half written by a killed run")

    errors = write_resized_cache(sources, targets, short_side=96, workers=2)

    assert errors == [
        None,
        None,
        f"{sources[2]}: not a recognised image format (starts with b'not an i')",
        None,
        None,
    ]
    assert _stored(targets[0]) == ("JPEG", "RGB", (128, 96))
    assert _stored(targets[1]) == (
        "JPEG",
        "RGB",
        (50, 40),
    )  # already smaller: kept at its own size, not upscaled
    assert not targets[2].exists()
    assert targets[3].read_bytes() == b"built by an earlier run"  # existing targets are skipped
    assert _stored(targets[4]) == ("JPEG", "RGB", (192, 96))
    assert _close(_pixel(load_rgb(targets[4]), 96, 48), (255, 0, 0), tolerance=3)
    assert sorted(path.name for path in cache.rglob("*") if path.is_file()) == [
        "cmyk.jpg",
        "done.jpg",
        "large.jpg",
        "small.jpg",
    ]


def test_write_resized_cache_second_run_writes_nothing_and_keeps_reporting_errors(tmp_path):
    sources = [_jpeg(tmp_path / "photo.jpg", 120, 90), tmp_path / "empty.jpg"]
    sources[1].write_bytes(b"")
    targets = [tmp_path / "cache" / "photo.jpg", tmp_path / "cache" / "empty.jpg"]
    first = write_resized_cache(sources, targets, short_side=30, workers=1)
    built = targets[0].stat().st_mtime_ns
    second = write_resized_cache(sources, targets, short_side=30, workers=1)
    assert first == [None, f"{sources[1]}: empty file (0 bytes), expected an image"]
    assert second == first
    assert targets[0].stat().st_mtime_ns == built
    assert _stored(targets[0])[2] == (40, 30)


# The report


def test_bad_image_report_lists_only_unreadable_files(tmp_path):
    checks = [
        ImageCheck(path=Path("train/a.jpg"), width=10, height=10, error=None),
        ImageCheck(
            path=Path("train/b.jpg"), width=None, height=None, error='train/b.jpg: empty file, "odd", really'
        ),
        ImageCheck(path=Path("test/c.jpg"), width=None, height=None, error="test/c.jpg: truncated"),
    ]
    report = tmp_path / "reports" / "bad_images.csv"
    write_bad_image_report(checks, report)
    assert report.read_text() == (
        "file,error\n"
        'train/b.jpg,"train/b.jpg: empty file, ""odd"", really"\n'
        "test/c.jpg,test/c.jpg: truncated\n"
    )
    with open(report, newline="") as handle:
        assert list(csv.DictReader(handle))[0]["error"] == 'train/b.jpg: empty file, "odd", really'
    assert [path.name for path in report.parent.iterdir()] == ["bad_images.csv"]


def test_bad_image_report_has_a_header_when_all_are_readable(tmp_path):
    report = tmp_path / "bad_images.csv"
    write_bad_image_report([ImageCheck(path=Path("a.jpg"), width=1, height=1, error=None)], report)
    assert report.read_text() == "file,error\n"
