import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def smoke():
    from unclip_lite.config import get_preset
    return get_preset("smoke")
