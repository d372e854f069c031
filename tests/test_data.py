"""Splits, sharded sampling, presets and the pre-resized image cache, on small generated images."""

import hashlib
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from kagglecls.data import (
    BackgroundLoader,
    DataError,
    EvalPreset,
    ImageDataset,
    Normalisation,
    SeededSampler,
    TrainPreset,
    TtaViews,
    cache_short_side,
    make_loader,
    resized_files,
)
from kagglecls.images import BadImageError, load_rgb
from kagglecls.manifest import ManifestRow, file_md5, read_manifest, stratified_split, write_manifest

LITE = Normalisation(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


def _noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _image_rows(folder: Path, sizes: list[tuple[int, int]]) -> list[ManifestRow]:
    rows = []
    for index, (width, height) in enumerate(sizes):
        path = folder / f"image{index}.png"
        _noise_image(width, height, seed=index).save(path)
        rows.append(ManifestRow(path.name, "a", "train", str(index), file_md5(path), width, height))
    return rows


# ---------------------------------------------------------------- split


def test_stratified_split_keeps_class_proportions():
    labels = ["a"] * 100 + ["b"] * 50 + ["c"] * 10
    splits = stratified_split(labels, valid_pct=0.2, seed=0)
    valid = Counter(label for label, split in zip(labels, splits, strict=True) if split == "valid")
    assert valid == {"a": 20, "b": 10, "c": 2}
    assert Counter(splits) == {"train": 128, "valid": 32}


def test_stratified_split_at_least_one_valid_never_all():
    labels = ["a"] * 10 + ["b"] * 5 + ["c"] * 2
    splits = stratified_split(labels, valid_pct=0.2, seed=0)
    valid = Counter(label for label, split in zip(labels, splits, strict=True) if split == "valid")
    # a: round(2.0) = 2; b: round(1.0) = 1; c: round(0.4) = 0, raised to 1.
    assert valid == {"a": 2, "b": 1, "c": 1}
    almost_all = stratified_split(["x", "x", "y", "y", "y"], valid_pct=0.9, seed=0)
    assert Counter(zip(["x", "x", "y", "y", "y"], almost_all, strict=True)) == {
        ("x", "valid"): 1,
        ("x", "train"): 1,
        ("y", "valid"): 2,
        ("y", "train"): 1,
    }


def test_stratified_split_is_deterministic_per_seed():
    labels = [f"class{index % 4}" for index in range(80)]
    assert stratified_split(labels, valid_pct=0.25, seed=1) == stratified_split(
        labels, valid_pct=0.25, seed=1
    )
    others = {tuple(stratified_split(labels, valid_pct=0.25, seed=seed)) for seed in range(2, 6)}
    assert len(others | {tuple(stratified_split(labels, valid_pct=0.25, seed=1))}) == 5


def test_stratified_split_refuses_a_class_of_one():
    with pytest.raises(DataError, match="class 'lonely' has 1 image; at least 2 are needed"):
        stratified_split(["a", "a", "lonely"], valid_pct=0.2, seed=0)


# ---------------------------------------------------------------- sampler


def _shards(n_items: int, world_size: int, *, epoch: int = 0) -> list[list[tuple[int, int]]]:
    shards = []
    for rank in range(world_size):
        sampler = SeededSampler(n_items, shuffle=True, seed=5, rank=rank, world_size=world_size)
        sampler.set_epoch(epoch)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1])
    return shards


def test_sampler_shards_without_overlap():
    shards = _shards(12, 3)
    indices = [[index for index, _seed in shard] for shard in shards]
    assert [len(shard) for shard in indices] == [4, 4, 4]
    assert sorted(index for shard in indices for index in shard) == list(range(12))


def test_sampler_pads_uneven_shards_to_the_same_length():
    shards = _shards(10, 3)
    indices = [index for shard in shards for index, _seed in shard]
    assert [len(shard) for shard in shards] == [4, 4, 4]
    assert set(indices) == set(range(10))
    assert sum(count - 1 for count in Counter(indices).values()) == 2  # 12 slots for 10 items


def test_sampler_seeds_per_item_and_epoch():
    whole = dict(_shards(10, 1)[0])
    sharded = dict(pair for shard in _shards(10, 2) for pair in shard)
    assert sharded == whole  # an item's augmentation seed does not depend on the number of ranks
    next_epoch = _shards(10, 1, epoch=1)[0]
    assert [index for index, _seed in next_epoch] != list(whole)
    assert all(seed != whole[index] for index, seed in next_epoch)
    assert [index for index, _seed in SeededSampler(5, shuffle=False, seed=5)] == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- presets


def test_eval_preset_scales_crops_and_normalises():
    image = Image.new("RGB", (50, 40), (255, 0, 128))
    tensor = EvalPreset(size=32, normalisation=LITE)(image)
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
    expected = [1.0, -1.0, (128 / 255 - 0.5) / 0.5]
    for channel, value in enumerate(expected):
        assert torch.allclose(tensor[channel], torch.full((32, 32), value), atol=1e-6)


@pytest.mark.parametrize("augmentation", ["side_on", "top_down", "none"])
def test_train_preset_shapes(augmentation):
    preset = TrainPreset(size=32, augmentation=augmentation, max_zoom=1.1, normalisation=LITE)
    rng = np.random.default_rng(0)
    for width, height in [(60, 45), (45, 60), (32, 32), (20, 30), (400, 300)]:
        tensor = preset(_noise_image(width, height), rng)
        assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32
        assert -1.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0


@pytest.mark.parametrize("augmentation", ["side_on", "top_down"])
def test_train_preset_is_deterministic_under_its_rng(augmentation):
    preset = TrainPreset(size=32, augmentation=augmentation, max_zoom=1.1, normalisation=LITE)
    image = _noise_image(60, 45)
    outputs = [preset(image, np.random.default_rng(seed)) for seed in (0, 0, 1)]
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])


def test_train_preset_none_is_the_eval_preset():
    image = _noise_image(60, 45)
    plain = TrainPreset(size=32, augmentation="none", max_zoom=1.1, normalisation=LITE)
    assert torch.equal(plain(image, np.random.default_rng(0)), EvalPreset(size=32, normalisation=LITE)(image))


def _train_preset_map(augmentation, seed, *, max_zoom=1.0):
    """Where the preset sends each pixel: a source whose pixel values encode their own coordinates."""
    preset = TrainPreset(size=32, augmentation=augmentation, max_zoom=max_zoom, normalisation=LITE)
    return preset._output_to_source((32, 32), np.random.default_rng(seed))


def test_train_preset_geometry_is_a_flip_rotation_zoom_and_crop():
    # With max_zoom 1 on a square source of the output size there is no room to crop or zoom: the map is a
    # rotation about the centre (at most 10 degrees) and maybe a horizontal flip, so it keeps lengths.
    corners = np.array([[0, 32, 0, 32], [0, 0, 32, 32], [1, 1, 1, 1]], dtype=float)
    angles = []
    for seed in range(200):
        matrix = _train_preset_map("side_on", seed)
        linear = matrix[:2, :2]
        assert np.allclose(linear @ linear.T, np.eye(2))  # orthogonal: no zoom
        assert np.allclose(matrix @ [16, 16, 1], [16, 16, 1])  # the centre stays put
        flipped = np.linalg.det(linear) < 0
        rotation = linear @ np.diag([-1, 1]) if flipped else linear
        angles.append(np.degrees(np.arctan2(rotation[1, 0], rotation[0, 0])))
        assert (matrix @ corners).shape == (3, 4)
    angles = np.array(angles)
    assert np.abs(angles).max() <= 10.0 + 1e-9
    assert 0.6 < np.mean(angles != 0) < 0.9  # rotated with p = 0.75
    assert (
        0.35
        < np.mean([np.linalg.det(_train_preset_map("side_on", seed)[:2, :2]) < 0 for seed in range(200)])
        < 0.65
    )


def test_basic_preset_rotates_but_never_flips():
    maps = [_train_preset_map("basic", seed)[:2, :2] for seed in range(200)]
    assert all(np.linalg.det(linear) > 0 for linear in maps)  # a flip reverses orientation
    assert 0.6 < np.mean([not np.allclose(linear, np.eye(2)) for linear in maps]) < 0.9  # rotated, p = 0.75


def test_train_preset_zoom_stays_within_max_zoom():
    preset = TrainPreset(size=32, augmentation="side_on", max_zoom=1.5, normalisation=LITE)
    scales = []
    for seed in range(100):
        matrix = preset._output_to_source((64, 48), np.random.default_rng(seed))
        scale = np.sqrt(abs(np.linalg.det(matrix[:2, :2])))  # source pixels per output pixel
        scales.append(scale)
        centre = matrix @ [16, 16, 1]
        assert 0 <= centre[0] <= 64 and 0 <= centre[1] <= 48
    # The shorter side (48) maps to between 32 and 32 x 1.5 output pixels.
    assert min(scales) >= 48 / 48 - 1e-9 and max(scales) <= 48 / 32 + 1e-9
    assert max(scales) - min(scales) > 0.2


def test_top_down_preset_reaches_the_whole_dihedral_group():
    seen = set()
    for seed in range(200):
        linear = _train_preset_map("top_down", seed)[:2, :2]
        seen.add(tuple(np.sign(np.round(linear, 0)).astype(int).ravel()))  # rotation <= 10 deg rounds away
    assert len(seen) == 8


def test_train_preset_flip_mirrors_the_pixels():
    # A left-to-right ramp: flipped outputs decrease along x, unflipped ones increase.
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 48, dtype=np.uint8)[None, :, None], (48, 1, 3)))
    preset = TrainPreset(size=32, augmentation="side_on", max_zoom=1.1, normalisation=LITE)
    directions = {
        bool(preset(ramp, np.random.default_rng(seed))[0, 16, 4:28].diff().mean() < 0) for seed in range(20)
    }
    assert directions == {True, False}


def test_tta_views_are_the_plain_view_then_augmented_ones():
    image = _noise_image(60, 45)
    plain = EvalPreset(size=32, normalisation=LITE)
    augmented = TrainPreset(size=32, augmentation="side_on", max_zoom=1.1, normalisation=LITE)
    views = TtaViews(plain=plain, augmented=augmented, n_aug=3)(image, np.random.default_rng(5))
    assert views.shape == (4, 3, 32, 32)
    assert torch.equal(views[0], plain(image))
    rng = np.random.default_rng(5)
    assert all(torch.equal(views[index], augmented(image, rng)) for index in (1, 2, 3))
    assert not torch.equal(views[1], views[2])


def test_image_dataset_and_loader_are_seeded_per_item(tmp_path):
    rows = _image_rows(tmp_path, [(40, 30), (30, 40), (36, 36)])
    preset = TrainPreset(size=24, augmentation="side_on", max_zoom=1.1, normalisation=LITE)
    dataset = ImageDataset([tmp_path / row.file for row in rows], [2, 0, 1], preset)
    image, label = dataset[(1, 123)]
    assert image.shape == (3, 24, 24) and label == 0
    assert torch.equal(dataset[(1, 123)][0], image)
    assert not torch.equal(dataset[(1, 124)][0], image)

    def batches():
        loader = make_loader(dataset, batch_size=2, shuffle=True, seed=4, num_workers=0)
        return [(images.clone(), labels.tolist()) for images, labels in loader]

    first, second = batches(), batches()
    assert [labels for _images, labels in first] == [labels for _images, labels in second]
    assert all(torch.equal(one, other) for (one, _), (other, _) in zip(first, second, strict=True))
    assert sorted(label for _images, labels in first for label in labels) == [0, 1, 2]


def test_loader_batches_and_global_rng_do_not_depend_on_workers(tmp_path):
    # Dropout draws from torch's global RNG: iterating a loader must not draw from it, or a run with loader
    # workers (persistent: one draw) would differ from one without (a draw every epoch) from epoch 2 on.
    rows = _image_rows(tmp_path, [(40, 30), (30, 40), (36, 36), (50, 40)])
    preset = TrainPreset(size=24, augmentation="side_on", max_zoom=1.1, normalisation=LITE)
    dataset = ImageDataset([tmp_path / row.file for row in rows], [0, 1, 2, 0], preset)
    runs = []
    for workers in (0, 1):
        torch.manual_seed(0)
        loader = make_loader(dataset, batch_size=2, shuffle=True, seed=4, num_workers=workers)
        batches = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            batches += [images.clone() for images, _labels in loader]
        runs.append((batches, torch.rand(3)))
    torch.manual_seed(0)
    untouched = torch.rand(3)
    assert all(torch.equal(one, other) for one, other in zip(runs[0][0], runs[1][0], strict=True))
    assert torch.equal(runs[0][1], untouched) and torch.equal(runs[1][1], untouched)


def test_dataset_keeps_decoded_images_up_to_its_budget(tmp_path, monkeypatch):
    import kagglecls.data as data_module

    rows = _image_rows(tmp_path, [(40, 30), (30, 40), (36, 36)])
    files = [tmp_path / row.file for row in rows]
    preset = TrainPreset(size=24, augmentation="side_on", max_zoom=1.1, normalisation=LITE)
    plain = ImageDataset(files, [0, 1, 2], preset)
    decoded = []

    def counting_load(path):
        decoded.append(Path(path).name)
        return load_rgb(path)

    monkeypatch.setattr(data_module, "load_rgb", counting_load)
    # Room for the first two images (3600 + 3600 bytes of RGB pixels), not the third (3888).
    kept = ImageDataset(files, [0, 1, 2], preset, keep_decoded_bytes=7500)
    for _epoch in range(3):
        for index in range(3):
            image, _label = kept[(index, 10 + index)]
            assert torch.equal(image, plain[(index, 10 + index)][0])
    # plain decodes 9 times; kept decodes images 0 and 1 once and image 2 every time.
    assert decoded.count("image0.png") == 1 + 3 and decoded.count("image1.png") == 1 + 3
    assert decoded.count("image2.png") == 3 + 3
    assert kept.decoded_bytes == 7200


def test_dataset_keeps_nothing_by_default(tmp_path):
    rows = _image_rows(tmp_path, [(20, 20)])
    dataset = ImageDataset([tmp_path / rows[0].file], [0], EvalPreset(size=16, normalisation=LITE))
    dataset[(0, 0)]
    assert dataset.decoded_bytes == 0


def test_background_loader_gives_the_plain_loaders_batches(tmp_path):
    rows = _image_rows(tmp_path, [(40, 30), (30, 40), (36, 36), (50, 40), (30, 30)])
    preset = TrainPreset(size=24, augmentation="side_on", max_zoom=1.1, normalisation=LITE)
    dataset = ImageDataset([tmp_path / row.file for row in rows], [0, 1, 2, 0, 1], preset)
    loader = make_loader(dataset, batch_size=2, shuffle=True, seed=4, num_workers=0)
    assert isinstance(loader, BackgroundLoader)
    plain = DataLoader(dataset, batch_size=2, sampler=loader.sampler)
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        background, made_in = [], set()
        for images, labels in loader:
            background.append((images, labels))
            made_in |= {thread.name for thread in threading.enumerate()}
        assert any(name.startswith("batches") for name in made_in)
        expected = list(plain)
        assert len(background) == len(expected) == 3
        for (images, labels), (expected_images, expected_labels) in zip(background, expected, strict=True):
            assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


def test_background_loader_raises_the_datasets_error_and_stops_on_break(tmp_path):
    rows = _image_rows(tmp_path, [(20, 20), (20, 20), (20, 20), (20, 20)])
    files = [tmp_path / row.file for row in rows]
    (tmp_path / rows[2].file).write_bytes(b"not an image")
    dataset = ImageDataset(files, [0, 0, 0, 0], EvalPreset(size=16, normalisation=LITE))
    loader = make_loader(dataset, batch_size=1, shuffle=False, seed=0, num_workers=0)
    with pytest.raises(BadImageError, match="image2.png"):
        list(loader)
    threads = threading.active_count()
    for _images, _labels in loader:
        break  # the background thread stops after the batch it is making
    assert threading.active_count() == threads


# ---------------------------------------------------------------- resize cache and manifest


def test_cache_short_side():
    assert cache_short_side(64, 1.3) == 83
    assert cache_short_side(224, 1.3) == 291
    assert cache_short_side(64, 1.0) == 64


def test_file_md5(tmp_path):
    path = tmp_path / "bytes.bin"
    path.write_bytes(b"kagglecls" * 1000)
    assert file_md5(path) == hashlib.md5(b"kagglecls" * 1000).hexdigest()


def test_resized_files_named_by_md5_and_short_side(tmp_path):
    root, cache = tmp_path / "images", tmp_path / "cache"
    root.mkdir()
    rows = _image_rows(root, [(60, 45), (30, 90), (20, 16)])
    paths = resized_files(rows, root=root, cache_dir=cache, short_side=24, workers=1)
    assert paths == [cache / "v1-short24" / row.md5[:2] / f"{row.md5}.jpg" for row in rows]
    sizes = [Image.open(path).size for path in paths]
    assert sizes == [(32, 24), (24, 72), (20, 16)]  # shorter side 24; a smaller image is not upscaled


def test_resized_files_reuse_existing_files_and_keep_other_sizes(tmp_path):
    root, cache = tmp_path / "images", tmp_path / "cache"
    root.mkdir()
    rows = _image_rows(root, [(60, 45), (45, 60)])
    first = resized_files(rows, root=root, cache_dir=cache, short_side=24, workers=1)
    first[0].write_bytes(b"already there")  # a file that exists is never rewritten
    again = resized_files(rows, root=root, cache_dir=cache, short_side=24, workers=1)
    assert again == first and first[0].read_bytes() == b"already there"
    larger = resized_files(rows, root=root, cache_dir=cache, short_side=40, workers=1)
    assert [path.parent.parent.name for path in larger] == ["v1-short40"] * 2
    assert min(Image.open(larger[1]).size) == 40
    assert first[0].read_bytes() == b"already there"  # the other size's cache is left alone


def test_resized_files_name_an_undecodable_image(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    row = ManifestRow("broken.jpg", "a", "train", "1", "ab" * 16, 0, 0)
    with pytest.raises(DataError, match="broken.jpg: cannot be decoded for the resize cache"):
        resized_files([row], root=tmp_path, cache_dir=tmp_path / "cache", short_side=24, workers=1)


def test_manifest_round_trip_and_column_check(tmp_path):
    rows = [
        ManifestRow("train/a.jpg", "dog", "train", "a", "0" * 32, 640, 480),
        ManifestRow("", "", "test", "b", "", 0, 0),
    ]
    path = tmp_path / "manifest.csv"
    write_manifest(rows, path)
    assert read_manifest(path) == rows
    assert [item.name for item in tmp_path.iterdir()] == ["manifest.csv"]
    path.write_text("file,label\n")
    with pytest.raises(
        DataError, match="manifest.csv: expected columns file,label,split,id,md5,width,height"
    ):
        read_manifest(path)
