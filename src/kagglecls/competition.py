"""Kaggle competitions in their three layouts (labels_csv: Dog Breed, class_folders: Plant Seedlings,
filename: Dogs vs. Cats Redux), and the embedded sample competition of scikit-learn's digits."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from kagglecls.atomic import building_folder
from kagglecls.errors import UserError, examples

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
LAYOUTS = ("auto", "labels_csv", "class_folders", "filename")
LABELS_FILE_NAMES = ("labels.csv", "train_labels.csv", "train.csv")
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


class CompetitionError(UserError):
    """A problem with the competition's files that the user can fix; the message is one line."""


@dataclass(frozen=True)
class Competition:
    train_files: tuple[Path, ...]  # absolute paths of labelled training images
    train_labels: tuple[str, ...]  # label of each, same order
    test_ids: tuple[str, ...]  # submission ids, in sample_submission.csv's order
    test_files: tuple[Path | None, ...]  # image for each id, None where the image is missing
    classes: tuple[str, ...]  # sorted class names
    warnings: tuple[str, ...]  # counted, human-readable warnings (images without a label, etc.)


# ------------------------------------------------------------------------------------------------------------
# The embedded sample competition


def build_sample_competition(
    dest: Path,
    *,
    n_classes: int = 10,
    train_per_class: int = 40,
    n_test: int = 100,
    image_size: int = 96,
    seed: int = 0,
) -> None:
    """Write a Dog-Breed-layout competition of handwritten digits to `dest`, byte-for-byte deterministic,
    built aside and moved into place whole. params.SampleParams holds the ranges of the arguments."""
    # Imported here: only the download stage builds a sample, and scikit-learn costs 0.8 s to import.
    from sklearn.datasets import load_digits

    digits = load_digits()  # shipped inside scikit-learn: 1797 8x8 images with values 0..16
    train_indices, test_indices = _split_digits(
        digits.target, n_classes=n_classes, train_per_class=train_per_class, n_test=n_test, seed=seed
    )
    classes = DIGIT_NAMES[:n_classes]
    with building_folder(Path(dest)) as work:
        train_ids = _write_digit_images(
            work / "train", digits.images, train_indices, image_size=image_size, seed=seed
        )
        test_ids = _write_digit_images(
            work / "test", digits.images, test_indices, image_size=image_size, seed=seed
        )
        labels = pd.DataFrame(
            {"id": train_ids, "breed": [classes[digits.target[index]] for index in train_indices]}
        )
        labels.sort_values("id").to_csv(work / "labels.csv", index=False, lineterminator="\n")
        sample = pd.DataFrame({"id": sorted(test_ids)})
        for class_name in sorted(classes):
            sample[class_name] = 1.0 / n_classes  # uniform, as Kaggle's own sample submissions are
        sample.to_csv(work / "sample_submission.csv", index=False, lineterminator="\n")
    logger.info("sample competition: %d train and %d test images in %s", len(train_ids), len(test_ids), dest)


def _split_digits(
    targets: np.ndarray, *, n_classes: int, train_per_class: int, n_test: int, seed: int
) -> tuple[list[int], list[int]]:
    """Indices of disjoint train digits (balanced: train_per_class of each class) and test digits."""
    order = np.random.default_rng(seed).permutation(len(targets))
    train: list[int] = []
    remaining: list[int] = []
    for class_index in range(n_classes):
        members = order[targets[order] == class_index]
        if len(members) < train_per_class:
            raise CompetitionError(
                f"sample competition: train_per_class={train_per_class} but digit {class_index} "
                f"has only {len(members)} images"
            )
        train.extend(int(index) for index in members[:train_per_class])
        remaining.extend(int(index) for index in members[train_per_class:])
    if n_test > len(remaining):
        raise CompetitionError(
            f"sample competition: n_test={n_test} but only {len(remaining)} digits are left "
            "after the training set"
        )
    test = np.random.default_rng([seed, 1]).permutation(remaining)[:n_test]
    return train, [int(index) for index in test]


def _sample_id(*, seed: int, digit_index: int) -> str:
    """A 32-hex-digit id like Dog Breed's, fixed by the seed and the digit."""
    return hashlib.sha256(f"kagglecls-sample/{seed}/{digit_index}".encode()).hexdigest()[:32]


def _write_digit_images(
    folder: Path, images: np.ndarray, indices: Sequence[int], *, image_size: int, seed: int
) -> list[str]:
    folder.mkdir()
    ids = []
    for digit_index in indices:
        image_id = _sample_id(seed=seed, digit_index=digit_index)
        # One generator per digit, so an image does not depend on which others are drawn.
        rng = np.random.default_rng([seed, digit_index])
        _render_digit(images[digit_index], image_size=image_size, rng=rng).save(
            folder / f"{image_id}.jpg", format="JPEG", quality=92
        )
        ids.append(image_id)
    return ids


def _render_digit(pixels: np.ndarray, *, image_size: int, rng: np.random.Generator) -> Image.Image:
    """An 8x8 digit (values 0..16) as a smooth RGB picture; ink and paper colours, size, position vary."""
    intensity = Image.fromarray(np.round(pixels * (255 / 16)).astype(np.uint8), mode="L")
    glyph_size = int(round(image_size * rng.uniform(0.65, 0.85)))
    glyph = intensity.resize((glyph_size, glyph_size), Image.Resampling.BICUBIC)
    canvas = Image.new("L", (image_size, image_size), 0)
    left, top = (int(offset) for offset in rng.integers(0, image_size - glyph_size + 1, size=2))
    canvas.paste(glyph, (left, top))
    ink_share = np.asarray(canvas, dtype=np.float64)[..., None] / 255
    paper = rng.uniform(150, 250, size=3)
    ink = rng.uniform(0, 90, size=3)
    # A gentle shade across the paper and a little sensor-like noise, in 0..255 units.
    shade = np.linspace(-12, 12, image_size)[None, :, None] * rng.choice([-1.0, 1.0])
    noise = rng.normal(0, 3, size=(image_size, image_size, 3))
    rgb = (paper + shade) * (1 - ink_share) + ink * ink_share + noise
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), mode="RGB")


# ------------------------------------------------------------------------------------------------------------
# Loading a competition


def load_competition(
    raw_dir: Path,
    *,
    layout: str = "auto",
    labels_file: str | None = None,
    id_column: str | None = None,
    label_column: str | None = None,
) -> Competition:
    """The labelled training images and the test image of every sample id of the competition in `raw_dir`."""
    raw_dir = Path(raw_dir).resolve()
    if layout not in LAYOUTS:
        raise CompetitionError(f"layout must be one of {', '.join(LAYOUTS)}, found {layout!r}")
    sample_path = raw_dir / "sample_submission.csv"
    test_ids = tuple(read_sample_table(sample_path).iloc[:, 0])
    train_folder = _image_folder(raw_dir / "train", role="training")
    if layout == "auto":
        layout = _detect_layout(raw_dir, train_folder, labels_file=labels_file, sample_path=sample_path)
    if layout == "labels_csv":
        labels_path = _find_labels_file(raw_dir, labels_file=labels_file, sample_path=sample_path)
        files, labels, train_warnings = _labels_from_table(
            labels_path, train_folder, id_column=id_column, label_column=label_column
        )
        source = str(labels_path)
    elif layout == "class_folders":
        files, labels, train_warnings = _labels_from_class_folders(train_folder)
        source = str(train_folder)
    else:
        files, labels, train_warnings = _labels_from_file_names(train_folder)
        source = str(train_folder)
    classes = _check_classes(labels, source=source)
    test_files, test_warnings = _match_test_images(
        test_ids, _image_folder(raw_dir / "test", role="test"), sample_path=sample_path
    )
    warnings = (*train_warnings, *test_warnings)
    for warning in warnings:
        logger.warning(warning)
    logger.info(
        "%s layout: %d training images in %d classes, %d test ids",
        layout,
        len(files),
        len(classes),
        len(test_ids),
    )
    return Competition(
        train_files=tuple(files),
        train_labels=tuple(labels),
        test_ids=test_ids,
        test_files=test_files,
        classes=classes,
        warnings=warnings,
    )


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder`, by name; any extension case (.JPG) counts."""
    return sorted(
        entry
        for entry in folder.iterdir()
        if entry.is_file() and not _is_hidden(entry.name) and entry.suffix.lower() in IMAGE_EXTENSIONS
    )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(entry for entry in folder.iterdir() if entry.is_dir() and not _is_hidden(entry.name))


def _image_folder(folder: Path, *, role: str) -> Path:
    """`folder`, or the single same-named folder inside it (`test/test/`, as some Kaggle zips unpack)."""
    if not folder.is_dir():
        found = "a file" if folder.exists() else "nothing"
        raise CompetitionError(f"{folder}: expected the folder of {role} images, found {found} there")
    while True:
        entries = [entry for entry in folder.iterdir() if not _is_hidden(entry.name)]
        if len(entries) == 1 and entries[0].is_dir() and entries[0].name.lower() == folder.name.lower():
            folder = entries[0]
        else:
            return folder


def _read_csv_strings(path: Path, *, what: str, header: int | None = 0) -> pd.DataFrame:
    """A CSV file with every cell as a string (ids such as '001' keep their zeros; blank cells are '')."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig", header=header)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CompetitionError(f"{path}: could not read the {what} as CSV: {reason}") from None
    return table.apply(lambda column: column.str.strip())


def _line_numbers(mask: Sequence[bool]) -> list[int]:
    """File line numbers of the table rows where `mask` is true (the header is line 1)."""
    return [row + 2 for row, flagged in enumerate(mask) if flagged]


def read_sample_table(sample_path: Path) -> pd.DataFrame:
    """sample_submission.csv as strings: distinct column names, an id column of unique non-empty ids first."""
    if not sample_path.is_file():
        raise CompetitionError(
            f"{sample_path}: sample submission not found; expected the competition's sample_submission.csv"
        )
    # Read without a header, so a repeated column name is not renamed away by pandas.
    rows = _read_csv_strings(sample_path, what="sample submission", header=None)
    header, table = list(rows.iloc[0]), rows.iloc[1:].reset_index(drop=True)
    table.columns = header
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise CompetitionError(f"{sample_path}: the header repeats column names {examples(repeated)}")
    if len(header) < 2 or len(table) == 0:
        raise CompetitionError(
            f"{sample_path}: expected an id column, at least one value column and at least one row, "
            f"found columns {examples(header)} and {len(table)} rows"
        )
    ids = table[header[0]]
    blank = _line_numbers(ids == "")
    if blank:
        raise CompetitionError(
            f"{sample_path}: line {blank[0]} has an empty id ({len(blank)} lines with no id)"
        )
    _check_unique_ids(ids, path=sample_path)
    return table


def _check_unique_ids(ids: pd.Series, *, path: Path) -> None:
    repeated = ids.duplicated(keep=False).to_numpy()
    if repeated.any():
        first = ids[repeated].iloc[0]
        first_lines = _line_numbers((ids == first).to_numpy())
        count = ids[repeated].nunique()
        raise CompetitionError(
            f"{path}: id {first!r} appears on lines {', '.join(map(str, first_lines))}; ids must be unique "
            f"({count} ids appear more than once)"
        )


def _labels_file_candidates(raw_dir: Path, *, sample_path: Path) -> list[Path]:
    for name in LABELS_FILE_NAMES:
        if (raw_dir / name).is_file():
            return [raw_dir / name]
    return sorted(
        path
        for path in raw_dir.iterdir()
        if path.is_file() and path.suffix.lower() == ".csv" and path.name != sample_path.name
    )


def _find_labels_file(raw_dir: Path, *, labels_file: str | None, sample_path: Path) -> Path:
    if labels_file is not None:
        path = raw_dir / labels_file
        if not path.is_file():
            raise CompetitionError(f"{path}: labels file (labels_file) not found")
        return path
    candidates = _labels_file_candidates(raw_dir, sample_path=sample_path)
    if len(candidates) == 1:
        return candidates[0]
    found = examples(path.name for path in candidates) if candidates else "no other csv"
    raise CompetitionError(
        f"{raw_dir}: expected one labels file ({', '.join(LABELS_FILE_NAMES)} or a single csv beside "
        f"{sample_path.name}), found {found}; set labels_file"
    )


def _detect_layout(raw_dir: Path, train_folder: Path, *, labels_file: str | None, sample_path: Path) -> str:
    if labels_file is not None:
        return "labels_csv"
    flat_images = _list_images(train_folder)
    class_folders = [folder for folder in _subfolders(train_folder) if _list_images(folder)]
    images_in_folders = sum(len(_list_images(folder)) for folder in class_folders)
    if len(class_folders) >= 2 and images_in_folders > len(flat_images):
        return "class_folders"
    candidates = _labels_file_candidates(raw_dir, sample_path=sample_path)
    if len(candidates) == 1:
        return "labels_csv"
    dotted = sum("." in image.stem for image in flat_images)
    if flat_images and 2 * dotted >= len(flat_images):
        return "filename"
    raise CompetitionError(
        f"{raw_dir}: cannot tell the layout: expected a labels csv with {train_folder.name}/<id>.jpg, "
        f"{train_folder.name}/<class>/ folders, or {train_folder.name}/<label>.<n>.jpg names; found "
        f"{len(flat_images)} images and {len(class_folders)} image folders in {train_folder} and csv files "
        f"{examples(path.name for path in candidates) or 'none'}; set layout (and labels_file)"
    )


def _pick_label_columns(
    table: pd.DataFrame, path: Path, *, id_column: str | None, label_column: str | None
) -> tuple[str, str]:
    columns = list(table.columns)
    found = f"found columns {examples(columns)}"
    for parameter, name in (("id_column", id_column), ("label_column", label_column)):
        if name is not None and name not in columns:
            raise CompetitionError(
                f"{path}: {parameter} {name!r} is not a column of the labels file; {found}"
            )
    chosen_id = id_column if id_column is not None else columns[0]
    if label_column is not None:
        chosen_label = label_column
    else:
        others = [column for column in columns if column != chosen_id]
        if len(others) != 1:
            raise CompetitionError(
                f"{path}: expected an id column and one label column, {found}; set id_column and label_column"
            )
        chosen_label = others[0]
    if chosen_label == chosen_id:
        raise CompetitionError(f"{path}: id_column and label_column are both {chosen_id!r}; {found}")
    return chosen_id, chosen_label


def _index_images(images: Sequence[Path]) -> dict[str, Path]:
    """Each image under its full name, its lower-cased full name and its stem (where the stem is unique)."""
    stem_counts = Counter(image.stem for image in images)
    index: dict[str, Path] = {}
    for image in images:
        index.setdefault(image.name.lower(), image)
        if stem_counts[image.stem] == 1:
            index[image.stem] = image
    for image in images:
        index[image.name] = image
    return index


def _find_image(index: dict[str, Path], image_id: str) -> Path | None:
    """The image an id names: by full name or stem, then ignoring case, then without a folder (`train/x.jpg`)."""
    name = image_id.replace("\\", "/").rsplit("/", 1)[-1]
    for key in (image_id, image_id.lower(), name, name.lower()):
        if key in index:
            return index[key]
    return None


def _labels_from_table(
    path: Path, train_folder: Path, *, id_column: str | None, label_column: str | None
) -> tuple[list[Path], list[str], list[str]]:
    table = _read_csv_strings(path, what="labels file")
    chosen_id, chosen_label = _pick_label_columns(table, path, id_column=id_column, label_column=label_column)
    for column in (chosen_id, chosen_label):
        blank = _line_numbers((table[column] == "").to_numpy())
        if blank:
            raise CompetitionError(
                f"{path}: line {blank[0]} has an empty {column!r} "
                f"({len(blank)} lines with an empty {column!r})"
            )
    _check_unique_ids(table[chosen_id], path=path)
    images = _list_images(train_folder)
    index = _index_images(images)
    files, labels, without_image = [], [], []
    for image_id, label in zip(table[chosen_id], table[chosen_label], strict=True):
        image = _find_image(index, image_id)
        if image is None:
            without_image.append(image_id)
        else:
            files.append(image)
            labels.append(label)
    labelled = set(files)
    unlabelled = [image.name for image in images if image not in labelled]
    warnings = _counted(without_image, f"ids in {path.name} have no image in {train_folder} (dropped)")
    warnings += _counted(unlabelled, f"images in {train_folder} have no label in {path.name} (ignored)")
    return files, labels, warnings


def _labels_from_class_folders(train_folder: Path) -> tuple[list[Path], list[str], list[str]]:
    files, labels, empty_folders = [], [], []
    for folder in _subfolders(train_folder):
        images = _list_images(folder)
        if not images:
            empty_folders.append(folder.name)
        files.extend(images)
        labels.extend([folder.name] * len(images))
    stray = [image.name for image in _list_images(train_folder)]
    warnings = _counted(empty_folders, f"folders in {train_folder} hold no images (ignored)")
    warnings += _counted(
        stray, f"images in {train_folder} are outside any class folder, so unlabelled (ignored)"
    )
    return files, labels, warnings


def _labels_from_file_names(train_folder: Path) -> tuple[list[Path], list[str], list[str]]:
    """The label is the part of the name before the first '.': `cat.123.jpg` is a cat."""
    files, labels, unlabelled = [], [], []
    for image in _list_images(train_folder):
        if "." in image.stem:
            files.append(image)
            labels.append(image.name.split(".", 1)[0])
        else:
            unlabelled.append(image.name)
    what = f"images in {train_folder} have no '<label>.' prefix in their name (ignored)"
    return files, labels, _counted(unlabelled, what)


def _counted(items: Sequence[str], what: str) -> list[str]:
    """A warning `<count> <what>: <examples>` when there are items, else none."""
    return [f"{len(items)} {what}: {examples(items)}"] if items else []


def _check_classes(labels: Sequence[str], *, source: str) -> tuple[str, ...]:
    counts = Counter(labels)
    if len(counts) < 2:
        raise CompetitionError(
            f"{source}: expected labelled training images of at least 2 classes, found {len(labels)} images "
            f"in {len(counts)} classes ({examples(sorted(counts)) or 'none'})"
        )
    too_small = sorted(name for name, count in counts.items() if count < 2)
    if too_small:
        first = too_small[0]
        raise CompetitionError(
            f"{source}: class {first!r} has {counts[first]} image; each class needs at least 2 for a "
            f"stratified train/valid split ({len(too_small)} such classes: {examples(too_small)})"
        )
    return tuple(sorted(counts))


def _match_test_images(
    test_ids: tuple[str, ...], test_folder: Path, *, sample_path: Path
) -> tuple[tuple[Path | None, ...], list[str]]:
    images = _list_images(test_folder)
    index = _index_images(images)
    files = tuple(_find_image(index, test_id) for test_id in test_ids)
    missing = [test_id for test_id, file in zip(test_ids, files, strict=True) if file is None]
    if len(missing) == len(test_ids):
        raise CompetitionError(
            f"{sample_path}: none of its {len(test_ids)} ids ({examples(test_ids)}) names an image in "
            f"{test_folder}, which holds {len(images)} images ({examples(image.name for image in images)})"
        )
    listed = set(files)
    unlisted = [image.name for image in images if image not in listed]
    return files, _counted(
        missing, f"ids in {sample_path.name} have no image in {test_folder} (they get the class prior)"
    ) + _counted(unlisted, f"images in {test_folder} are not in {sample_path.name} (ignored)")
