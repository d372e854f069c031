"""Submission formats read from sample_submission.csv, built, validated and written, checked value by value."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kagglecls.competition import CompetitionError
from kagglecls.params import Params
from kagglecls.submission import (
    SubmissionError,
    SubmissionFormat,
    build_submission,
    make_submission,
    read_sample_submission,
    validate_submission,
    write_submission,
)


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def dog_breed_sample(tmp_path) -> Path:
    return write_text(
        tmp_path / "sample_submission.csv",
        "id,akita,beagle,corgi\n002,0.333,0.333,0.333\n001,0.333,0.333,0.333\n003,0.333,0.333,0.333\n",
    )


@pytest.fixture
def dogs_vs_cats_sample(tmp_path) -> Path:
    return write_text(tmp_path / "sample_submission.csv", "id,label\n1,0.5\n2,0.5\n10,0.5\n")


@pytest.fixture
def plant_seedlings_sample(tmp_path) -> Path:
    return write_text(
        tmp_path / "sample_submission.csv", "file,species\nb.png,Sugar beet\na.png,Sugar beet\n"
    )


# ------------------------------------------------------------------------------------------------------------
# Reading the format


def test_one_column_per_class_is_probabilities(dog_breed_sample):
    fmt = read_sample_submission(dog_breed_sample, classes=("corgi", "akita", "beagle"))

    assert fmt == SubmissionFormat(
        kind="probabilities",
        id_column="id",
        value_columns=("akita", "beagle", "corgi"),
        ids=("002", "001", "003"),
        positive_class=None,
    )


def test_probability_columns_must_match_the_training_classes(dog_breed_sample):
    with pytest.raises(SubmissionError) as error:
        read_sample_submission(dog_breed_sample, classes=("akita", "beagle", "dingo", "husky"))

    message = str(error.value)
    assert "sample_submission.csv" in message
    assert "the training labels lack 1 ('corgi') and have 2 in excess ('dingo', 'husky')" in message


def test_one_column_of_class_names_is_label(plant_seedlings_sample):
    fmt = read_sample_submission(plant_seedlings_sample, classes=("Maize", "Sugar beet", "Charlock"))

    assert (fmt.kind, fmt.id_column, fmt.value_columns, fmt.ids) == (
        "label",
        "file",
        ("species",),
        ("b.png", "a.png"),
    )


def test_one_column_of_numbers_that_are_class_names_is_label(tmp_path):
    path = write_text(tmp_path / "sample_submission.csv", "image_id,label\nx.jpg,4\ny.jpg,4\n")

    assert read_sample_submission(path, classes=("0", "1", "2", "3", "4")).kind == "label"
    assert read_sample_submission(path).kind == "label"  # 4 is no probability


def test_one_numeric_column_is_binary_with_the_class_sorting_last_as_positive(dogs_vs_cats_sample):
    fmt = read_sample_submission(dogs_vs_cats_sample, classes=("dog", "cat"))

    assert (fmt.kind, fmt.value_columns, fmt.ids, fmt.positive_class) == (
        "binary",
        ("label",),
        ("1", "2", "10"),
        "dog",
    )


def test_binary_positive_class_from_param_or_column_name(tmp_path, dogs_vs_cats_sample):
    named_column = write_text(tmp_path / "named.csv", "id,is_dog\n1,0.5\n")

    assert (
        read_sample_submission(
            dogs_vs_cats_sample, classes=("cat", "dog"), positive_class="cat"
        ).positive_class
        == "cat"
    )
    assert read_sample_submission(named_column, classes=("dog", "wolf")).positive_class == "dog"
    assert read_sample_submission(dogs_vs_cats_sample).positive_class is None


def test_binary_positive_class_must_be_a_class(dogs_vs_cats_sample):
    with pytest.raises(
        SubmissionError, match=r"positive_class 'cow' is not a training class; .*'cat', 'dog'"
    ):
        read_sample_submission(dogs_vs_cats_sample, classes=("cat", "dog"), positive_class="cow")


def test_binary_needs_exactly_two_classes(dogs_vs_cats_sample):
    with pytest.raises(
        SubmissionError, match=r"column 'label' needs exactly 2 classes, .* have 3 \('a', 'b', 'c'\)"
    ):
        read_sample_submission(dogs_vs_cats_sample, classes=("c", "b", "a"))


def test_missing_sample_is_an_error_naming_it(tmp_path):
    with pytest.raises(CompetitionError, match=r"nowhere\.csv: sample submission not found"):
        read_sample_submission(tmp_path / "nowhere.csv")


def test_sample_with_repeated_ids_names_the_lines(tmp_path):
    path = write_text(tmp_path / "sample_submission.csv", "id,label\n1,0.5\n2,0.5\n1,0.5\n")

    with pytest.raises(CompetitionError, match=r"sample_submission\.csv: id '1' appears on lines 2, 4;"):
        read_sample_submission(path)


def test_sample_with_only_an_id_column_is_an_error(tmp_path):
    path = write_text(tmp_path / "sample_submission.csv", "id\n1\n")

    with pytest.raises(
        CompetitionError, match=r"expected an id column, at least one value column .* found columns 'id'"
    ):
        read_sample_submission(path)


def test_several_value_columns_must_hold_numbers(tmp_path):
    path = write_text(tmp_path / "sample_submission.csv", "id,first,second\n1,a,0.5\n")

    with pytest.raises(SubmissionError, match=r"columns 'first' hold values that are not numbers"):
        read_sample_submission(path)


# ------------------------------------------------------------------------------------------------------------
# Building


def test_built_probabilities_follow_the_sample_columns_whatever_the_class_order(dog_breed_sample):
    fmt = read_sample_submission(dog_breed_sample)
    classes = ("corgi", "akita", "beagle")  # not the sample's column order
    probabilities = np.array(
        [[0.3, 0.6, 0.1], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    )  # rows in the sample's order

    frame = build_submission(fmt, classes=classes, probabilities=probabilities)

    assert list(frame.columns) == ["id", "akita", "beagle", "corgi"]
    assert list(frame["id"]) == ["002", "001", "003"]
    assert np.allclose(
        frame[["akita", "beagle", "corgi"]].to_numpy(), [[0.6, 0.1, 0.3], [0.2, 0.1, 0.7], [0.1, 0.8, 0.1]]
    )
    validate_submission(frame, fmt)


def test_built_labels_are_the_most_probable_class_names(plant_seedlings_sample):
    fmt = read_sample_submission(plant_seedlings_sample)
    classes = ("Charlock", "Maize", "Sugar beet")

    frame = build_submission(fmt, classes=classes, probabilities=np.array([[0.2, 0.3, 0.5], [0.1, 0.7, 0.2]]))

    assert frame.to_dict("list") == {"file": ["b.png", "a.png"], "species": ["Sugar beet", "Maize"]}
    validate_submission(frame, fmt)


def test_built_binary_column_is_the_positive_class_probability(dogs_vs_cats_sample):
    fmt = read_sample_submission(dogs_vs_cats_sample, classes=("cat", "dog"))
    probabilities = np.array([[0.9, 0.1], [0.25, 0.75], [0.4, 0.6]])

    frame = build_submission(fmt, classes=("cat", "dog"), probabilities=probabilities)
    swapped = build_submission(fmt, classes=("dog", "cat"), probabilities=probabilities[:, ::-1])

    assert frame.to_dict("list") == {"id": ["1", "2", "10"], "label": [0.1, 0.75, 0.6]}
    assert swapped.to_dict("list") == frame.to_dict("list")


def test_binary_without_a_positive_class_in_the_format_picks_it_when_building(dogs_vs_cats_sample):
    fmt = read_sample_submission(dogs_vs_cats_sample)

    frame = build_submission(
        fmt, classes=("cat", "dog"), probabilities=np.array([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    )

    assert list(frame["label"]) == [0.1, 0.8, 0.5]


def test_made_submission_puts_predictions_in_the_sample_order_and_gives_missing_ids_the_prior(
    tmp_path, dog_breed_sample
):
    reorganised = tmp_path / "reorganised"
    reorganised.mkdir()
    info = {"classes": ["akita", "beagle", "corgi"], "prior": [0.5, 0.25, 0.25], "warnings": []}
    (reorganised / "classes.json").write_text(json.dumps(info))
    predictions = tmp_path / "predictions.npz"
    np.savez(
        predictions, ids=np.array(["003", "001"]), probabilities=np.array([[0.1, 0.1, 0.8], [0.7, 0.2, 0.1]])
    )
    out_csv = tmp_path / "submission.csv"

    make_submission(
        params=Params(), raw_dir=tmp_path, reorganised=reorganised, predictions=predictions, out_csv=out_csv
    )

    frame = pd.read_csv(out_csv, dtype={"id": str})
    assert list(frame["id"]) == ["002", "001", "003"]  # the sample's order, 002 without a prediction
    assert np.allclose(
        frame[["akita", "beagle", "corgi"]], [[0.5, 0.25, 0.25], [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    )


def test_building_with_the_wrong_probability_shape_is_an_error(dog_breed_sample):
    fmt = read_sample_submission(dog_breed_sample)

    with pytest.raises(SubmissionError, match=r"expected shape \(3, 3\) .* found \(3, 2\)"):
        build_submission(fmt, classes=("akita", "beagle", "corgi"), probabilities=np.ones((3, 2)))


# ------------------------------------------------------------------------------------------------------------
# Validating


@pytest.fixture
def probability_format() -> SubmissionFormat:
    return SubmissionFormat(
        kind="probabilities",
        id_column="id",
        value_columns=("a", "b"),
        ids=("x", "y", "z"),
        positive_class=None,
    )


def probability_frame() -> pd.DataFrame:
    return pd.DataFrame({"id": ["x", "y", "z"], "a": [0.25, 0.5, 1.0], "b": [0.75, 0.5, 0.0]})


def test_a_good_submission_passes(probability_format):
    validate_submission(probability_frame(), probability_format)


def test_columns_out_of_order_name_the_first_differing_column(probability_format):
    frame = probability_frame()[["id", "b", "a"]]

    with pytest.raises(
        SubmissionError, match=r"submission column 2 is 'b' where the sample has 'a' \(2 of 3 column"
    ):
        validate_submission(frame, probability_format)


def test_a_missing_column_is_named(probability_format):
    with pytest.raises(SubmissionError, match=r"submission column 3 is nothing where the sample has 'b'"):
        validate_submission(probability_frame()[["id", "a"]], probability_format)


def test_ids_out_of_order_name_the_row_and_count(probability_format):
    frame = probability_frame().iloc[[0, 2, 1]]

    with pytest.raises(SubmissionError) as error:
        validate_submission(frame, probability_format)

    assert str(error.value).startswith(
        "submission row 2 is id 'z' where the sample has id 'y' (2 rows differ; 3 rows"
    )


def test_a_missing_row_is_named(probability_format):
    with pytest.raises(
        SubmissionError, match=r"submission row 3 is missing where the sample has id 'z' \(1 rows differ"
    ):
        validate_submission(probability_frame().iloc[:2], probability_format)


def test_a_repeated_id_is_named(probability_format):
    frame = probability_frame()
    frame.loc[2, "id"] = "y"

    with pytest.raises(SubmissionError, match=r"submission row 3 is id 'y' where the sample has id 'z'"):
        validate_submission(frame, probability_format)


def test_a_value_that_is_not_finite_names_row_column_and_count(probability_format):
    frame = probability_frame()
    frame.loc[1, "a"] = np.nan
    frame.loc[2, "b"] = np.inf

    with pytest.raises(SubmissionError) as error:
        validate_submission(frame, probability_format)

    assert str(error.value) == (
        "submission row 2 (id 'y'): column 'a' is nan, expected a finite probability in [0, 1] (2 bad rows)"
    )


def test_a_negative_probability_is_named(probability_format):
    frame = probability_frame()
    frame.loc[0, ["a", "b"]] = [-0.25, 1.25]

    with pytest.raises(
        SubmissionError, match=r"row 1 \(id 'x'\): column 'a' is -0\.25, expected a finite probability"
    ):
        validate_submission(frame, probability_format)


def test_rows_must_sum_to_one(probability_format):
    frame = probability_frame()
    frame.loc[2, "a"] = 0.9
    frame.loc[0, "b"] = 0.75 + 5e-5  # within the tolerance

    with pytest.raises(
        SubmissionError, match=r"row 3 \(id 'z'\): probabilities sum to 0\.9, expected 1 .*\(1 bad rows\)"
    ):
        validate_submission(frame, probability_format)


def test_every_row_needs_a_label():
    fmt = SubmissionFormat(
        kind="label", id_column="file", value_columns=("species",), ids=("a", "b"), positive_class=None
    )

    validate_submission(pd.DataFrame({"file": ["a", "b"], "species": ["Maize", "Mayze"]}), fmt)
    with pytest.raises(
        SubmissionError, match=r"row 2 \(id 'b'\): label '' is not a class name \(1 bad rows\)"
    ):
        validate_submission(pd.DataFrame({"file": ["a", "b"], "species": ["Maize", ""]}), fmt)


def test_binary_values_must_be_probabilities():
    fmt = SubmissionFormat(
        kind="binary", id_column="id", value_columns=("label",), ids=("1", "2"), positive_class="dog"
    )
    frame = pd.DataFrame({"id": [1, 2], "label": [0.5, 2.0]})  # numeric ids as pandas reads them back

    with pytest.raises(
        SubmissionError, match=r"row 2 \(id '2'\): column 'label' is 2\.0, expected .* \(1 bad rows\)"
    ):
        validate_submission(frame, fmt)


# ------------------------------------------------------------------------------------------------------------
# Writing


def test_written_submission_reads_back_the_same_and_keeps_leading_zeros(tmp_path, dog_breed_sample):
    fmt = read_sample_submission(dog_breed_sample)
    frame = build_submission(fmt, classes=("akita", "beagle", "corgi"), probabilities=np.full((3, 3), 1 / 3))
    path = tmp_path / "out" / "submission.csv"

    write_submission(frame, path)

    assert path.read_text().splitlines()[:2] == ["id,akita,beagle,corgi", f"002,{1 / 3},{1 / 3},{1 / 3}"]
    validate_submission(pd.read_csv(path, dtype={"id": str}), fmt)
    assert sorted(item.name for item in path.parent.iterdir()) == ["submission.csv"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = write_text(tmp_path / "submission.csv", "id,label\nold,0.5\n")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", fail)
    with pytest.raises(OSError, match="disk full"):
        write_submission(pd.DataFrame({"id": ["new"], "label": [0.1]}), path)

    assert path.read_text() == "id,label\nold,0.5\n"
    assert [item.name for item in tmp_path.iterdir()] == ["submission.csv"]


def test_messages_are_one_line(dog_breed_sample):
    fmt = read_sample_submission(dog_breed_sample)
    with pytest.raises(SubmissionError) as error:
        validate_submission(pd.DataFrame({"id": ["002"], "akita": [1.0]}), fmt)

    assert not re.search(r"\n", str(error.value))
