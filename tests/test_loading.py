"""Loader settings that depend on the machine: kagglecls.loading.loader_workers."""

import pytest

from kagglecls import images
from kagglecls.loading import loader_workers


@pytest.mark.parametrize(
    ("requested", "device_type", "cores", "processes", "expected"),
    [
        (3, "cpu", 2, 1, 3),  # a number is used as it is
        (0, "cuda", 16, 1, 0),
        ("auto", "cpu", 2, 1, 0),  # on CPU the compute threads need the cores
        ("auto", "cpu", 64, 1, 0),
        ("auto", "cuda", 16, 1, 8),  # every core but one, at most 8
        ("auto", "cuda", 4, 1, 3),
        ("auto", "cuda", 16, 4, 3),  # 4 torchrun processes share the 16 cores
        ("auto", "cuda", 2, 4, 1),  # never fewer than one on a GPU
    ],
)
def test_loader_workers(monkeypatch, requested, device_type, cores, processes, expected):
    monkeypatch.setattr(images, "image_workers", lambda: cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    assert loader_workers(requested, device_type=device_type) == expected


@pytest.mark.parametrize(("num_workers", "kept_mb"), [(0, 3), (1, 0)])
def test_image_loader_keeps_decoded_images_only_without_workers(tmp_path, num_workers, kept_mb):
    # Workers would each keep a copy of every image; without them the dataset keeps up to the budget.
    import numpy as np
    from PIL import Image

    from kagglecls.data import EvalPreset, Normalisation
    from kagglecls.loading import Split, image_loader
    from kagglecls.manifest import ManifestRow, file_md5
    from kagglecls.params import params_from_mapping

    path = tmp_path / "train" / "a.png"
    path.parent.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(path)
    row = ManifestRow("train/a.png", "a", "train", "a", file_md5(path), 40, 40)
    params = params_from_mapping(
        {"base": {"num_workers": num_workers, "decoded_cache_mb": 3, "device": "cpu"}}
    )
    loader = image_loader(
        params,
        tmp_path,
        tmp_path / "cache",
        Split([row], np.array([0])),
        transform=EvalPreset(size=32, normalisation=Normalisation((0.5,) * 3, (0.5,) * 3)),
        shuffle=False,
        size=32,
        batch_size=1,
    )
    assert loader.num_workers == num_workers
    assert loader.dataset.keep_decoded_bytes == kept_mb * 2**20
