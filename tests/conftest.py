"""Shared fixtures: the embedded model (loaded once per session), seeding, a stable model cache."""

import getpass
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer

from mlsae_lens.models import CACHE_ENV_VAR, load_model


@pytest.fixture(scope="session", autouse=True)
def model_cache_dir() -> Iterator[Path]:
    """Point the model cache at a per-user folder in the system temp dir for the session.

    Tests then never write into the user's ``~/.cache``, a fresh CI machine builds the cache
    once (~30 s), and later runs on the same machine reuse it. An explicit
    ``MLSAE_LENS_CACHE`` wins.
    """
    existing = os.environ.get(CACHE_ENV_VAR)
    if existing:
        yield Path(existing)
        return
    path = Path(tempfile.gettempdir()) / f"mlsae_lens_test_cache-{getpass.getuser()}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(CACHE_ENV_VAR, str(path))
        yield path


@pytest.fixture(autouse=True)
def seed_everything() -> None:
    """Seed torch, random and numpy before every test so random inputs are reproducible."""
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def embedded_model(model_cache_dir: Path) -> HookedTransformer:
    """SmolLM2-135M-Instruct through the default backend (CPU, float32), shared by all tests.

    Treat it as read-only: tests that add hooks must remove them (``model.hooks(...)`` or
    ``run_with_cache`` do this for you).
    """
    return load_model()
