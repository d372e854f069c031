"""Shared test settings."""

import os

# One intra-op thread: on small shared CPU machines, OpenMP threads spinning against each other make the
# tiny tensors of these tests up to 100x slower (measured: 2 s instead of 15 ms for one EfficientNet-Lite0
# forward on 2 loaded cores). Set before any test module imports torch; an explicit setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
