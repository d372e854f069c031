"""Competition layouts, table checks and the embedded sample competition, on tiny generated files."""

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier

from kagglecls.competition import DIGIT_NAMES, CompetitionError, build_sample_competition, load_competition

IMAGE_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}


def write_image(path: Path, *, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), colour).save(path, format=IMAGE_FORMATS[path.suffix.lower()])
    return path


def write_text(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def make_dog_breed(raw: Path) -> Path:
    """labels.csv (id,breed) with stems, train/<id>.jpg, test/<id>.jpg, a probability sample."""
    write_text(raw / "labels.csv", "id,breed\nb1,beagle\na1,akita\nb2,beagle\na2,akita\n")
    for stem in ("a1", "a2", "b1", "b2"):
        write_image(raw / "train" / f"{stem}.jpg")
    for stem in ("t2", "t1"):
        write_image(raw / "test" / f"{stem}.jpg")
    write_text(raw / "sample_submission.csv", "id,akita,beagle\nt2,0.5,0.5\nt1,0.5,0.5\n")
    return raw


# ------------------------------------------------------------------------------------------------------------
# Layouts


def test_labels_table_layout_matches_ids_by_stem_in_table_and_sample_order(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")

    competition = load_competition(raw)

    train = raw.resolve() / "train"
    assert competition.train_files == (train / "b1.jpg", train / "a1.jpg", train / "b2.jpg", train / "a2.jpg")
    assert competition.train_labels == ("beagle", "akita", "beagle", "akita")
    assert competition.classes == ("akita", "beagle")
    assert competition.test_ids == ("t2", "t1")
    assert competition.test_files == (raw.resolve() / "test" / "t2.jpg", raw.resolve() / "test" / "t1.jpg")
    assert competition.warnings == ()
    assert all(path.is_absolute() for path in competition.train_files)


def test_labels_table_with_file_names_or_paths_other_column_names_and_any_extension_case(tmp_path):
    raw = tmp_path / "raw"
    write_text(
        raw / "train_labels.csv", "image,category\nx.JPG,cat\ny.png,dog\nz.jpeg,cat\ntrain/w.PNG,dog\n"
    )
    for name in ("x.JPG", "y.png", "z.jpeg", "w.PNG"):
        write_image(raw / "train" / name)
    write_image(raw / "test" / "q.webp")
    write_text(raw / "sample_submission.csv", "image,cat,dog\nq.webp,0.5,0.5\n")

    competition = load_competition(raw)

    assert [path.name for path in competition.train_files] == ["x.JPG", "y.png", "z.jpeg", "w.PNG"]
    assert competition.train_labels == ("cat", "dog", "cat", "dog")
    assert competition.test_files == (raw.resolve() / "test" / "q.webp",)


def test_labels_file_is_the_single_other_csv_beside_the_sample(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")
    (raw / "labels.csv").rename(raw / "breeds_2018.csv")

    competition = load_competition(raw)

    assert competition.train_labels == ("beagle", "akita", "beagle", "akita")


def test_labels_file_and_column_overrides(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")
    (raw / "labels.csv").unlink()
    write_text(
        raw / "meta" / "annotations.csv",
        "width,breed_name,file\n4,beagle,b1\n4,akita,a1\n4,akita,a2\n4,beagle,b2\n",
    )
    write_text(raw / "other.csv", "unrelated\n1\n")

    competition = load_competition(
        raw, labels_file="meta/annotations.csv", id_column="file", label_column="breed_name"
    )

    assert [path.name for path in competition.train_files] == ["b1.jpg", "a1.jpg", "a2.jpg", "b2.jpg"]
    assert competition.train_labels == ("beagle", "akita", "akita", "beagle")
    assert competition.classes == ("akita", "beagle")


def test_class_folders_layout_with_full_name_ids_stray_image_and_empty_folder(tmp_path):
    raw = tmp_path / "raw"
    for name in ("c1.png", "c2.PNG"):
        write_image(raw / "train" / "Charlock" / name)
    for name in ("m1.png", "m2.jpg", "m3.png"):
        write_image(raw / "train" / "Maize" / name)
    (raw / "train" / "Empty").mkdir()
    write_image(raw / "train" / "stray.png")
    write_text(raw / "train" / "notes.txt", "not an image")
    for name in ("0a.png", "0b.png"):
        write_image(raw / "test" / name)
    write_text(raw / "sample_submission.csv", "file,species\n0b.png,Maize\n0a.png,Maize\n")

    competition = load_competition(raw)

    train = raw.resolve() / "train"
    assert competition.train_files == (
        train / "Charlock" / "c1.png",
        train / "Charlock" / "c2.PNG",
        train / "Maize" / "m1.png",
        train / "Maize" / "m2.jpg",
        train / "Maize" / "m3.png",
    )
    assert competition.train_labels == ("Charlock", "Charlock", "Maize", "Maize", "Maize")
    assert competition.classes == ("Charlock", "Maize")
    assert competition.test_ids == ("0b.png", "0a.png")
    assert [path.name for path in competition.test_files] == ["0b.png", "0a.png"]
    assert len(competition.warnings) == 2
    assert competition.warnings[0].startswith("1 folders in ") and "'Empty'" in competition.warnings[0]
    assert competition.warnings[1].startswith("1 images in ") and "'stray.png'" in competition.warnings[1]


def test_file_name_layout_with_numeric_ids_and_nested_folders(tmp_path):
    raw = tmp_path / "raw"
    for name in ("cat.0.jpg", "cat.1.jpg", "dog.0.jpg", "dog.1.JPG", "dog.2.jpeg"):
        write_image(raw / "train" / "train" / name)
    for stem in ("1", "2", "10"):
        write_image(raw / "test" / "test" / f"{stem}.jpg")
    write_text(raw / "sample_submission.csv", "id,label\n1,0.5\n2,0.5\n10,0.5\n")

    competition = load_competition(raw)

    assert [path.name for path in competition.train_files] == [
        "cat.0.jpg",
        "cat.1.jpg",
        "dog.0.jpg",
        "dog.1.JPG",
        "dog.2.jpeg",
    ]
    assert competition.train_labels == ("cat", "cat", "dog", "dog", "dog")
    assert competition.classes == ("cat", "dog")
    assert competition.test_ids == ("1", "2", "10")
    test = raw.resolve() / "test" / "test"
    assert competition.test_files == (test / "1.jpg", test / "2.jpg", test / "10.jpg")


def test_explicit_layout_wins_over_detection(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")
    for name in ("cat.1.jpg", "cat.2.jpg", "dog.1.jpg", "dog.2.jpg"):
        write_image(raw / "train" / name)

    detected = load_competition(raw)
    by_file_name = load_competition(raw, layout="filename")

    assert detected.classes == ("akita", "beagle")
    assert by_file_name.classes == ("cat", "dog")
    assert by_file_name.warnings[0].startswith("4 images in ")  # a1.jpg etc. have no '<label>.' prefix


# ------------------------------------------------------------------------------------------------------------
# Table checks: errors where the result would be wrong, counted warnings where it can go on


def test_missing_sample_submission_is_an_error_naming_it(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")
    (raw / "sample_submission.csv").unlink()

    with pytest.raises(CompetitionError, match=r"sample_submission\.csv: sample submission not found"):
        load_competition(raw)


def test_labels_file_without_the_expected_columns_names_file_and_columns(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")
    write_text(raw / "labels.csv", "id,breed,weight\na1,akita,3\n")

    with pytest.raises(CompetitionError) as error:
        load_competition(raw)

    message = str(error.value)
    assert "labels.csv" in message
    assert "found columns 'id', 'breed', 'weight'" in message
    assert "\n" not in message


def test_unknown_label_column_names_file_and_columns(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")

    with pytest.raises(
        CompetitionError, match=r"labels\.csv: label_column 'species' is not a column .*'id', 'breed'"
    ):
        load_competition(raw, label_column="species")


def test_duplicate_ids_name_the_lines(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")
    write_text(raw / "labels.csv", "id,breed\nb1,beagle\na1,akita\nb1,akita\na2,akita\nb2,beagle\n")

    with pytest.raises(CompetitionError) as error:
        load_competition(raw)

    assert re.search(
        r"labels\.csv: id 'b1' appears on lines 2, 4; .*\(1 ids appear more than once\)", str(error.value)
    )


def test_empty_label_names_the_line(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")
    write_text(raw / "labels.csv", "id,breed\nb1,beagle\na1,\nb2,beagle\na2,akita\n")

    with pytest.raises(CompetitionError, match=r"labels\.csv: line 3 has an empty 'breed'"):
        load_competition(raw)


def test_labels_whose_image_is_missing_are_dropped_with_a_counted_warning(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")
    write_text(
        raw / "labels.csv", "id,breed\nb1,beagle\na1,akita\ngone,akita\nb2,beagle\na2,akita\nlost,akita\n"
    )

    competition = load_competition(raw)

    assert competition.train_labels == ("beagle", "akita", "beagle", "akita")
    assert len(competition.warnings) == 1
    assert competition.warnings[0].startswith("2 ids in labels.csv have no image in ")
    assert competition.warnings[0].endswith("(dropped): 'gone', 'lost'")


def test_images_without_a_label_are_ignored_with_a_counted_warning(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")
    write_image(raw / "train" / "extra.jpg")

    competition = load_competition(raw)

    assert len(competition.train_files) == 4
    assert competition.warnings == (
        f"1 images in {raw.resolve() / 'train'} have no label in labels.csv (ignored): 'extra.jpg'",
    )


def test_sample_ids_without_a_test_image_get_none_and_a_counted_warning(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")
    write_text(raw / "sample_submission.csv", "id,akita,beagle\nt2,0.5,0.5\nmissing,0.5,0.5\nt1,0.5,0.5\n")

    competition = load_competition(raw)

    test = raw.resolve() / "test"
    assert competition.test_ids == ("t2", "missing", "t1")
    assert competition.test_files == (test / "t2.jpg", None, test / "t1.jpg")
    assert competition.warnings == (
        f"1 ids in sample_submission.csv have no image in {test} (they get the class prior): 'missing'",
    )


def test_no_sample_id_matching_any_test_image_is_an_error(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")
    write_text(raw / "sample_submission.csv", "id,akita,beagle\nx,0.5,0.5\ny,0.5,0.5\n")

    with pytest.raises(CompetitionError, match=r"sample_submission\.csv: none of its 2 ids \('x', 'y'\)"):
        load_competition(raw)


def test_class_with_fewer_than_two_images_is_an_error_naming_it(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")
    write_image(raw / "train" / "c1.jpg")
    write_text(raw / "labels.csv", "id,breed\nb1,beagle\na1,akita\nb2,beagle\na2,akita\nc1,corgi\n")

    with pytest.raises(CompetitionError) as error:
        load_competition(raw)

    assert "class 'corgi' has 1 image" in str(error.value)
    assert "labels.csv" in str(error.value)


def test_class_folder_with_one_image_is_an_error_naming_it(tmp_path):
    raw = tmp_path / "raw"
    for name in ("c1.png", "c2.png"):
        write_image(raw / "train" / "Charlock" / name)
    write_image(raw / "train" / "Maize" / "m1.png")
    write_image(raw / "test" / "t.png")
    write_text(raw / "sample_submission.csv", "file,species\nt.png,Maize\n")

    with pytest.raises(CompetitionError, match=r"class 'Maize' has 1 image; .*\(1 such classes: 'Maize'\)"):
        load_competition(raw)


def test_unknown_layout_is_an_error_listing_the_allowed_ones(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")

    with pytest.raises(CompetitionError, match=r"layout must be one of auto, labels_csv, .* found 'flat'"):
        load_competition(raw, layout="flat")


def test_missing_training_folder_is_an_error_naming_it(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")
    shutil.rmtree(raw / "train")

    with pytest.raises(
        CompetitionError, match=r"train: expected the folder of training images, found nothing"
    ):
        load_competition(raw)


def test_undetectable_layout_is_an_error(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")
    (raw / "labels.csv").unlink()

    with pytest.raises(
        CompetitionError, match=r"cannot tell the layout: .* found 4 images and 0 image folders"
    ):
        load_competition(raw)


def test_several_candidate_label_files_ask_for_labels_file(tmp_path):
    raw = make_dog_breed(tmp_path / "raw")
    (raw / "labels.csv").rename(raw / "a.csv")
    write_text(raw / "b.csv", "id,breed\n")

    with pytest.raises(CompetitionError, match=r"found 'a\.csv', 'b\.csv'; set labels_file"):
        load_competition(raw, layout="labels_csv")


# ------------------------------------------------------------------------------------------------------------
# The embedded sample competition


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("sample") / "raw"
    build_sample_competition(dest)
    return dest


def test_sample_competition_is_byte_for_byte_deterministic(sample_dir, tmp_path):
    build_sample_competition(tmp_path / "again")

    first, second = file_hashes(sample_dir), file_hashes(tmp_path / "again")
    assert len(first) == 400 + 100 + 2
    assert first == second


def test_sample_competition_differs_with_the_seed(tmp_path):
    build_sample_competition(tmp_path / "a", n_classes=2, train_per_class=2, n_test=2, image_size=16, seed=1)
    build_sample_competition(tmp_path / "b", n_classes=2, train_per_class=2, n_test=2, image_size=16, seed=2)

    assert file_hashes(tmp_path / "a") != file_hashes(tmp_path / "b")


def test_sample_competition_has_the_dog_breed_layout(sample_dir):
    labels = pd.read_csv(sample_dir / "labels.csv", dtype=str)
    sample = pd.read_csv(sample_dir / "sample_submission.csv", dtype={"id": str})

    assert list(labels.columns) == ["id", "breed"]
    assert labels["breed"].value_counts().to_dict() == {
        name: 40 for name in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    }
    assert list(labels["id"]) == sorted(labels["id"])
    assert all(re.fullmatch(r"[0-9a-f]{32}", image_id) for image_id in [*labels["id"], *sample["id"]])
    assert list(sample.columns) == ["id", *sorted(labels["breed"].unique())]
    assert list(sample.columns[1:4]) == ["eight", "five", "four"]
    assert len(sample) == 100
    assert np.array_equal(sample.iloc[:, 1:].to_numpy(), np.full((100, 10), 0.1))
    # Ids are fixed by the digit, so disjoint ids mean train and test are drawn from disjoint digits.
    assert not set(labels["id"]) & set(sample["id"])
    with Image.open(sample_dir / "train" / f"{labels['id'][0]}.jpg") as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (96, 96))


def test_sample_competition_loads_cleanly(sample_dir):
    competition = load_competition(sample_dir)

    assert len(competition.train_files) == 400
    assert competition.classes == (
        "eight",
        "five",
        "four",
        "nine",
        "one",
        "seven",
        "six",
        "three",
        "two",
        "zero",
    )
    assert len(competition.test_ids) == 100
    assert None not in competition.test_files
    assert competition.warnings == ()


def square_ink_8x8(ink: np.ndarray) -> np.ndarray:
    """The ink (values 0..1) cut to a square around its bounding box and shrunk to 8x8, as the digits are."""
    rows = np.flatnonzero(ink.max(axis=1) > 0.35)
    columns = np.flatnonzero(ink.max(axis=0) > 0.35)
    pad = ink.shape[0]  # the square may reach past the picture's edge
    centre_y, centre_x = pad + (rows[0] + rows[-1] + 1) / 2, pad + (columns[0] + columns[-1] + 1) / 2
    half = max(rows[-1] + 1 - rows[0], columns[-1] + 1 - columns[0]) / 2
    padded = Image.fromarray(np.round(np.pad(ink, pad) * 255).astype(np.uint8))
    box = (centre_x - half, centre_y - half, centre_x + half, centre_y + half)
    return np.asarray(padded.resize((8, 8), Image.Resampling.BOX, box=box), dtype=np.float64).ravel() / 255


def test_sample_images_keep_the_digit_readable(sample_dir):
    """Shrunk back to 8x8, 95% of the training pictures are nearest to scikit-learn digits of their class."""
    digits = load_digits()
    reference = np.array([square_ink_8x8(image / 16) for image in digits.images])
    neighbours = KNeighborsClassifier(n_neighbors=3).fit(reference, digits.target)
    labels = pd.read_csv(sample_dir / "labels.csv", dtype=str)
    recovered = []
    for image_id in labels["id"]:
        with Image.open(sample_dir / "train" / f"{image_id}.jpg") as image:
            grey = np.asarray(image.convert("L"), dtype=np.float64)
        recovered.append(square_ink_8x8((grey.max() - grey) / (grey.max() - grey.min())))
    expected = [DIGIT_NAMES.index(name) for name in labels["breed"]]

    accuracy = np.mean(neighbours.predict(np.array(recovered)) == expected)

    assert accuracy >= 0.95


def test_sample_competition_replaces_dest_whole_and_leaves_no_temporary_folder(tmp_path):
    dest = tmp_path / "raw"
    write_text(dest / "stale.txt", "from an earlier run")

    build_sample_competition(dest, n_classes=3, train_per_class=2, n_test=3, image_size=16)

    assert sorted(path.name for path in tmp_path.iterdir()) == ["raw"]
    assert sorted(path.name for path in dest.iterdir()) == [
        "labels.csv",
        "sample_submission.csv",
        "test",
        "train",
    ]
    assert len(list((dest / "train").iterdir())) == 6
    assert pd.read_csv(dest / "sample_submission.csv").columns.tolist() == ["id", "one", "two", "zero"]


def test_sample_competition_needs_enough_digits(tmp_path):
    # The arguments' ranges are params.SampleParams' (test_params); the digits per class are the data's.
    with pytest.raises(CompetitionError, match=r"train_per_class=500 but digit 0 has only 178 images"):
        build_sample_competition(tmp_path / "raw", train_per_class=500)
    assert not list(tmp_path.iterdir())
