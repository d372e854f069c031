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
