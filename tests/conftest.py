import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def smoke():
    from unclip_lite.config import get_preset
    return get_preset("smoke")


@pytest.fixture(scope="session")
def smoke_artifacts(tmp_path_factory):
    """Every stage at the smoke preset (seconds), in one artifacts folder shared by the tests."""
    from unclip_lite.clip import ensure_clip
    from unclip_lite.config import get_preset
    from unclip_lite.decoder import ensure_decoder
    from unclip_lite.prior import ensure_prior
    from unclip_lite.upsampler import ensure_upsampler
    folder = tmp_path_factory.mktemp("artifacts")
    smoke = get_preset("smoke")
    clip = ensure_clip(folder, smoke, progress=False)
    ensure_decoder(folder, smoke, clip, progress=False)
    for kind in ("diffusion", "ar"):
        ensure_prior(folder, smoke, clip, kind=kind, progress=False)
    ensure_upsampler(folder, smoke, progress=False)
    return folder


@pytest.fixture(scope="session")
def smoke_pipe(smoke_artifacts):
    from unclip_lite.pipeline import UnCLIP
    return UnCLIP.from_artifacts(smoke_artifacts)
