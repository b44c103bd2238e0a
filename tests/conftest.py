import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Two cores: keep torch from oversubscribing them when tests start subprocesses.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def repo_root() -> Path:
    return ROOT
