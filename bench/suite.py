"""The recipe benchmark's suite: small Kaggle-like competitions generated from images shipped inside
scikit-learn (its digits and two sample photos) and scikit-image (its bundled photos), nothing downloaded.

Each competition is written to `<work>/<name>/competition/`, in one of the layouts the pipeline detects
(kagglecls.competition), and its test labels to `<work>/<name>/test_labels.csv` (`id,label`), beside the
folder the pipeline reads, never in it. A `.spec.json` marker holds the generator and its settings, so a
rerun reuses a competition already written for the same spec. Generation is deterministic for a spec.

The embedded sample (`data.source: sample`) is the one competition that depends on the seed: the pipeline
builds it from `base.seed` and `data.sample`, so the suite builds the same one per seed (with the pipeline's
own build_sample_competition) only to read its test ids and their labels; recipe.py checks that the copy's
`data/raw` holds exactly these files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

log = logging.getLogger("bench.suite")

# Raise when a generator's output changes for the same spec, so cached competitions are written again.
SUITE_VERSION = 2
COMPETITION_FOLDER = "competition"
TEST_LABELS_FILE = "test_labels.csv"
MARKER_FILE = ".spec.json"
JPEG_QUALITY = 90

# Colour photos: scikit-learn's two sample images and scikit-image's bundled colour photos.
SKLEARN_PHOTOS = {"china": "china.jpg", "flower": "flower.jpg"}
COLOUR_PHOTOS = (
    "china",
    "flower",
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "stereo_motorcycle",
)
# Grey photos and textures bundled with scikit-image (brick, grass and gravel look alike on purpose).
GREY_PHOTOS = ("camera", "coins", "moon", "page", "text", "brick", "grass", "gravel")


# Crop heights as fractions of the photo's height for the photo competitions: small patches, so that a class
# is told by a region's texture and colour rather than the whole scene (whole-scene crops scored 0.00x).
SMALL_CROPS = (0.1, 0.25)


# ------------------------------------------------------------------------------------------------------------
# The suite


@dataclass(frozen=True)
class CropSpec:
    """A competition whose class k is made of random crops of photo k (position, scale, rotation, flip and
    colour jitter), resized to width x height."""

    photos: tuple[str, ...]  # one source photo per class; the class is named after it
    train_counts: tuple[int, ...]  # training images of each class
    test_per_class: int
    layout: str  # class_folders | labels_csv
    width: int = 160  # px
    height: int = 120
    crop_heights: tuple[float, float] = (0.35, 0.9)  # crop height as a fraction of the photo's height
    max_rotation: float = 10.0  # degrees either way
    train_region: tuple[float, float] = (0.0, 1.0)  # the horizontal part of each photo training crops lie in
    test_region: tuple[float, float] = (0.0, 1.0)  # and test crops
    seed: int = 0


@dataclass(frozen=True)
class DigitPairSpec:
    """Dogs vs. Cats Redux's layout (train/cat.N.jpg, test/N.jpg, `id,label` of 0.5) with two digit classes
    drawn as the embedded sample draws its digits: close enough (3 and 5) to be short of 100%."""

    digits: tuple[int, int] = (3, 5)
    names: tuple[str, str] = ("cat", "dog")  # the class whose name sorts last is Kaggle's positive class
    train_per_class: int = 50
    test_per_class: int = 30
    image_size: int = 96  # px
    seed: int = 0


@dataclass(frozen=True)
class SampleSpec:
    """The embedded sample: build_sample_competition's arguments, as the download stage passes them."""

    n_classes: int
    train_per_class: int
    n_test: int
    image_size: int
    seed: int


@dataclass(frozen=True)
class SuiteCompetition:
    name: str
    generator: Callable[[Path, object], None]  # writes <folder>/competition and <folder>/test_labels.csv
    spec: CropSpec | DigitPairSpec | None  # None for the sample: its spec follows the seed and data.sample
    layout: str  # what load_competition should detect
    about: str
    overrides: Mapping[str, object] = field(default_factory=dict)  # params for this competition
    embedded_sample: bool = False  # run with data.source: sample instead of the generated folder


@dataclass(frozen=True)
class Prepared:
    """A competition on disk, ready for one pipeline run."""

    source: str  # data.source: "sample" or the competition folder
    competition_dir: Path
    test_labels_path: Path


def fewshot_counts(n_classes: int = 18, *, fewest: int = 5, most: int = 30) -> tuple[int, ...]:
    """Imbalanced training counts: class k gets fewest + k x (most - fewest) / (n_classes - 1), rounded."""
    return tuple(fewest + round(k * (most - fewest) / (n_classes - 1)) for k in range(n_classes))


def generate_sample(folder: Path, spec: SampleSpec) -> None:
    """The competition `data.source: sample` builds for this seed, and its test labels (digit names)."""
    from sklearn.datasets import load_digits

    from kagglecls.competition import DIGIT_NAMES, build_sample_competition, load_competition

    destination = folder / COMPETITION_FOLDER
    build_sample_competition(destination, **asdict(spec))
    # The sample's ids are a hash of the seed and the digit's index in load_digits: map every index's id
    # back to its digit, so the labels do not depend on how the builder splits the digits.
    from kagglecls.competition import _sample_id

    targets = load_digits().target
    label_of = {
        _sample_id(seed=spec.seed, digit_index=index): DIGIT_NAMES[target]
        for index, target in enumerate(targets)
    }
    test_ids = load_competition(destination).test_ids
    unknown = [test_id for test_id in test_ids if test_id not in label_of]
    if unknown:
        raise RuntimeError(
            f"{destination}: {len(unknown)} test ids (e.g. {unknown[0]!r}) are not the hash of any digit's index: "
            "kagglecls.competition._sample_id changed; the suite cannot label the sample's test images"
        )
    write_test_labels(folder, {test_id: label_of[test_id] for test_id in test_ids})


def generate_crops(folder: Path, spec: CropSpec) -> None:
    """Training crops in `spec.layout`, test crops in test/ under opaque ids, a uniform sample submission."""
    destination = folder / COMPETITION_FOLDER
    (destination / "train").mkdir(parents=True)
    (destination / "test").mkdir()
    training_rows, test_labels = [], {}
    for class_index, (photo_name, count) in enumerate(zip(spec.photos, spec.train_counts, strict=True)):
        photo = Image.fromarray(load_photo(photo_name))
        for split, n_images, region in (
            ("train", count, spec.train_region),
            ("test", spec.test_per_class, spec.test_region),
        ):
            for index in range(n_images):
                image_id = opaque_id(spec.seed, split, photo_name, index)
                rng = np.random.default_rng([spec.seed, class_index, split == "test", index])
                crop = random_crop(photo, rng, spec=spec, region=region)
                if split == "test":
                    test_labels[image_id] = photo_name
                    path = destination / "test" / f"{image_id}.jpg"
                elif spec.layout == "class_folders":
                    path = destination / "train" / photo_name / f"{image_id}.jpg"
                else:
                    training_rows.append((image_id, photo_name))
                    path = destination / "train" / f"{image_id}.jpg"
                path.parent.mkdir(exist_ok=True)
                crop.save(path, format="JPEG", quality=JPEG_QUALITY)
    if spec.layout == "labels_csv":
        write_csv(destination / "labels.csv", ["id", "label"], sorted(training_rows))
    elif spec.layout != "class_folders":
        raise ValueError(f"CropSpec.layout must be class_folders or labels_csv, found {spec.layout!r}")
    write_probability_sample(destination, sorted(test_labels), classes=sorted(spec.photos))
    write_test_labels(folder, test_labels)


def generate_digit_pair(folder: Path, spec: DigitPairSpec) -> None:
    """train/<name>.<n>.jpg, test/<n>.jpg (the classes shuffled together), sample `id,label` with 0.5."""
    from sklearn.datasets import load_digits

    from kagglecls.competition import _render_digit  # the sample's own drawing of a digit

    digits = load_digits()
    destination = folder / COMPETITION_FOLDER
    (destination / "train").mkdir(parents=True)
    (destination / "test").mkdir()
    test_items = []
    for digit, name in zip(spec.digits, spec.names, strict=True):
        members = np.random.default_rng([spec.seed, digit]).permutation(
            np.flatnonzero(digits.target == digit)
        )
        for number, index in enumerate(members[: spec.train_per_class]):
            image = _render_digit(
                digits.images[index], image_size=spec.image_size, rng=_digit_rng(spec, index)
            )
            image.save(destination / "train" / f"{name}.{number}.jpg", format="JPEG", quality=JPEG_QUALITY)
        test_members = members[spec.train_per_class : spec.train_per_class + spec.test_per_class]
        test_items += [(int(index), name) for index in test_members]
    order = np.random.default_rng([spec.seed, 1]).permutation(len(test_items))
    test_labels = {}
    for number, position in enumerate(order, start=1):  # Kaggle numbers the test images from 1
        index, name = test_items[position]
        image = _render_digit(digits.images[index], image_size=spec.image_size, rng=_digit_rng(spec, index))
        image.save(destination / "test" / f"{number}.jpg", format="JPEG", quality=JPEG_QUALITY)
        test_labels[str(number)] = name
    write_csv(destination / "sample_submission.csv", ["id", "label"], [(i, "0.5") for i in test_labels])
    write_test_labels(folder, test_labels)


def _digit_rng(spec: DigitPairSpec, digit_index: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, 7, digit_index])


SUITE = (
    SuiteCompetition(
        name="sample",
        generator=generate_sample,
        spec=None,
        layout="labels_csv",
        about="the embedded sample (data.source: sample): 10 digit classes, built from base.seed",
        embedded_sample=True,
    ),
    SuiteCompetition(
        name="photos_class_folders",
        generator=generate_crops,
        spec=CropSpec(
            photos=COLOUR_PHOTOS,
            train_counts=(35,) * len(COLOUR_PHOTOS),
            test_per_class=15,
            layout="class_folders",
            crop_heights=SMALL_CROPS,
        ),
        layout="class_folders",
        about="random crops of 10 photos, 160x120, train/<class>/, probability columns",
    ),
    SuiteCompetition(
        name="binary_filename",
        generator=generate_digit_pair,
        spec=DigitPairSpec(),
        layout="filename",
        about="digits 3 (cat) vs 5 (dog), 100 train, Dogs vs. Cats Redux layout, `id,label` = P(dog)",
    ),
    SuiteCompetition(
        name="fewshot_many",
        generator=generate_crops,
        spec=CropSpec(
            photos=COLOUR_PHOTOS + GREY_PHOTOS,
            train_counts=fewshot_counts(len(COLOUR_PHOTOS + GREY_PHOTOS)),
            test_per_class=4,
            layout="labels_csv",
            width=120,
            height=90,
            crop_heights=SMALL_CROPS,
        ),
        layout="labels_csv",
        about="18 photo classes (8 grey), 5 to 30 training images a class, labels.csv, 120x90",
    ),
    SuiteCompetition(
        name="large_128",
        generator=generate_crops,
        spec=CropSpec(
            photos=COLOUR_PHOTOS[:8],
            train_counts=(30,) * 8,
            test_per_class=10,
            layout="labels_csv",
            width=256,
            height=192,
            crop_heights=SMALL_CROPS,
        ),
        layout="labels_csv",
        about="crops of 8 photos at 256x192, run at 128 px",
        overrides={"base.image_size": 128, "finetune.sizes": [128]},
    ),
    SuiteCompetition(
        name="shifted_test",
        generator=generate_crops,
        spec=CropSpec(
            photos=COLOUR_PHOTOS[:8],
            train_counts=(30,) * 8,
            test_per_class=15,
            layout="class_folders",
            crop_heights=SMALL_CROPS,
            train_region=(0.0, 0.6),
            test_region=(0.6, 1.0),
        ),
        layout="class_folders",
        about="8 photos: train and valid crops from each photo's left 60%, test crops from its right 40%",
    ),
)
SUITE_NAMES = tuple(entry.name for entry in SUITE)


def by_name(name: str) -> SuiteCompetition:
    for entry in SUITE:
        if entry.name == name:
            return entry
    raise KeyError(f"no competition {name!r} in the suite; expected one of {', '.join(SUITE_NAMES)}")


def prepare(entry: SuiteCompetition, work: Path, *, seed: int, sample_params: Mapping[str, int]) -> Prepared:
    """The competition written under `work` (reused when its marker matches); `sample_params` is the run's
    data.sample, which with `seed` fixes the embedded sample."""
    spec = SampleSpec(**sample_params, seed=seed) if entry.embedded_sample else entry.spec
    folder = work / entry.name / f"seed-{seed}" if entry.embedded_sample else work / entry.name
    marker = {"version": SUITE_VERSION, "generator": entry.generator.__name__, "spec": asdict(spec)}
    marker_path = folder / MARKER_FILE
    if not (marker_path.is_file() and json.loads(marker_path.read_text()) == json.loads(json.dumps(marker))):
        log.info("generating competition %s in %s", entry.name, folder)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        entry.generator(folder, spec)
        marker_path.write_text(
            json.dumps(marker, indent=1) + "\n"
        )  # last: a half-written folder has no marker
    source = "sample" if entry.embedded_sample else str((folder / COMPETITION_FOLDER).resolve())
    return Prepared(
        source=source, competition_dir=folder / COMPETITION_FOLDER, test_labels_path=folder / TEST_LABELS_FILE
    )


# ------------------------------------------------------------------------------------------------------------
# Photos and crops


@cache
def load_photo(name: str) -> np.ndarray:
    """A bundled photo as (height, width, 3) uint8 RGB; grey ones repeated over the three channels."""
    if name in SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image

        pixels = load_sample_image(SKLEARN_PHOTOS[name])
    else:
        import skimage.data

        pixels = getattr(skimage.data, name)()
        if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
            pixels = pixels[0]
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3], dtype=np.uint8)


def random_crop(
    photo: Image.Image, rng: np.random.Generator, *, spec: CropSpec, region: tuple[float, float]
) -> Image.Image:
    """A rotated crop lying wholly inside `region` (fractions of the photo's width), resampled once straight
    to the output size, then flipped and colour-jittered."""
    width, height = spec.width, spec.height
    angle = math.radians(rng.uniform(-spec.max_rotation, spec.max_rotation))
    cos, sin = math.cos(angle), math.sin(angle)
    # Source pixels per output pixel; the rotated crop's bounding box must fit the region and the photo.
    span_x = width * abs(cos) + height * abs(sin)
    span_y = width * abs(sin) + height * abs(cos)
    region_left, region_right = region[0] * photo.width, region[1] * photo.width
    # 1% slack, so that rounding never puts a corner of the largest crop outside the region.
    largest = 0.99 * min((region_right - region_left) / span_x, photo.height / span_y)
    step = min(rng.uniform(*spec.crop_heights) * photo.height / height, largest)
    centre_x = rng.uniform(region_left + step * span_x / 2, region_right - step * span_x / 2)
    centre_y = rng.uniform(step * span_y / 2, photo.height - step * span_y / 2)
    # PIL's affine maps each output pixel (u, v) to the source point (a u + b v + c, d u + e v + f).
    a, b, d, e = step * cos, -step * sin, step * sin, step * cos
    coefficients = (
        a,
        b,
        centre_x - a * width / 2 - b * height / 2,
        d,
        e,
        centre_y - d * width / 2 - e * height / 2,
    )
    crop = photo.transform((width, height), Image.Transform.AFFINE, coefficients, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return jitter_colour(crop, rng)


def jitter_colour(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness and contrast within 20%, each channel's gain within 8%, as a camera's white balance."""
    pixels = np.asarray(image, dtype=np.float64)
    mean = pixels.mean()
    pixels = (pixels - mean) * rng.uniform(0.8, 1.2) + mean * rng.uniform(0.8, 1.2)
    pixels *= rng.uniform(0.92, 1.08, size=3)
    return Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))


def opaque_id(seed: int, split: str, class_name: str, index: int) -> str:
    """A 16-hex-digit id that says nothing of the class, as Kaggle's ids."""
    return hashlib.sha256(f"recipe-suite/{seed}/{split}/{class_name}/{index}".encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------------------
# Files


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    lines = [",".join(header), *[",".join(str(cell) for cell in row) for row in rows]]
    path.write_text("\n".join(lines) + "\n")


def write_probability_sample(destination: Path, test_ids: Sequence[str], *, classes: Sequence[str]) -> None:
    """sample_submission.csv: the id and one uniform probability column per class, as Dog Breed's."""
    uniform = f"{1 / len(classes):.6f}"
    write_csv(
        destination / "sample_submission.csv",
        ["id", *classes],
        [(i, *[uniform] * len(classes)) for i in test_ids],
    )


def write_test_labels(folder: Path, labels: Mapping[str, str]) -> None:
    """The kept-aside answers, `id,label`, beside (not in) the competition folder."""
    write_csv(folder / TEST_LABELS_FILE, ["id", "label"], sorted(labels.items()))


def read_test_labels(path: Path) -> dict[str, str]:
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0] != "id,label":
        raise ValueError(f"{path}: expected the header id,label, found {lines[:1]}")
    return dict(line.rsplit(",", 1) for line in lines[1:])
