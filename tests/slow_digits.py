"""A digits handler that sleeps in every forward pass: the slower candidate the rollout's latency gate must stop.

Tests only: packed with the trained digits weights by tests/test_rollout.py through servekit's own build_archive.
"""

from __future__ import annotations

import time

import torch
from digits import DigitsHandler

# Far above a batch's compute even on a loaded CI machine (a digits batch of 4 took 100 ms there).
SLEEP_S = 0.3


class SlowDigitsHandler(DigitsHandler):
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        time.sleep(SLEEP_S)
        return super().forward(batch)
