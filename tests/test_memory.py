"""kagglecls.memory: glibc's malloc keeping freed memory, and handing it back before workers are forked.

Each check runs in a fresh process, so the allocator settings of pytest's own process are left alone.
"""

import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Resident megabytes of this process, and of the workers then forked by images._map_in_workers (the image
# checks and the resize cache) or by a data loader, after a 200 MB block was allocated (every page touched)
# and freed.
SCRIPT = textwrap.dedent(
    """
    import ctypes, os, sys
    import torch
    from kagglecls import data, images, memory

    def resident_mb(_=None):
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    class Resident(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return resident_mb()

    if __name__ == "__main__":
        if sys.argv[1] == "keep":
            assert memory.keep_freed_memory()
        before = resident_mb()
        block = ctypes.create_string_buffer(200 * 2**20)
        del block
        after_free = resident_mb() - before
        if sys.argv[2] == "pool":
            workers = images._map_in_workers(resident_mb, [0, 1], workers=2, description="rss")
        else:
            loader = data.BackgroundLoader(Resident(), batch_size=1, num_workers=2)
            workers = [float(batch) for batch in loader]
        after_fork = resident_mb() - before
        print(f"{after_free:.0f} {after_fork:.0f} {max(workers) - before:.0f}")
    """
)


def _resident_growth(tmp_path: Path, mode: str, workers: str) -> tuple[float, float, float]:
    script = tmp_path / "memory_check.py"
    script.write_text(SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), mode, workers],
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    after_free, after_fork, worker = map(float, result.stdout.split())
    return after_free, after_fork, worker


@pytest.mark.parametrize("workers", ["pool", "loader"])
def test_kept_memory_stays_with_the_process_until_workers_are_forked_and_they_get_none_of_it(
    tmp_path, workers
):
    after_free, after_fork, worker = _resident_growth(tmp_path, "keep", workers)
    assert after_free >= 190  # the freed 200 MB stays resident, ready for the next batch
    assert after_fork < 50  # handed back before the fork
    assert worker < 50  # so no worker starts with a copy of it


def test_without_keeping_a_freed_block_goes_back_to_the_system_at_once(tmp_path):
    after_free, after_fork, worker = _resident_growth(tmp_path, "default", "pool")
    assert after_free < 50 and after_fork < 50 and worker < 50
