"""Settings for the whole run: offline, Hugging Face and retnet caches in temporary folders,
Triton's interpreter on CPU tensors, a fixed seed per test; fixtures shared by several files."""

import os
import shutil
import tempfile
from pathlib import Path

# Offline, and Hugging Face caches out of the user's home (set before anything imports them).
os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                  HF_HOME=tempfile.mkdtemp(prefix="retnet-hf-"), TOKENIZERS_PARALLELISM="false")
# The Triton kernels run on CPU tensors in Triton's interpreter; the variable is read when a
# kernel is defined, so it is set before any test module imports one.
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """Every cache the run writes (tokenised data, kernel builds) goes to one temporary folder,
    set for the whole session so that module-scoped fixtures use it too, never the user's.
    The compiled kernels are copied in from where `make kernels` built them, not rebuilt.
    Yields (the private folder, the user's cache: $RETNET_CACHE, else ~/.cache/retnet)."""
    from retnet.kernels.build import cache_dir

    users, cache = cache_dir(), tmp_path_factory.mktemp("retnet-cache")
    for built in users.glob("kernels-*"):
        shutil.copytree(built, cache / built.name, ignore=shutil.ignore_patterns("lock", "*.tmp"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RETNET_CACHE", str(cache))
        yield cache, users


@pytest.fixture(scope="session")
def user_cache(_private_cache) -> Path:
    """The cache folder the user's own runs use, read before the run moved RETNET_CACHE."""
    return _private_cache[1]


@pytest.fixture(params=["kernel", "reference"])
def fast(request):
    """Each test twice: the fast paths on (True) and off (False), for tests of a kernel
    against its reference."""
    from retnet import kernels

    kernels.set_enabled(request.param == "kernel")
    yield request.param == "kernel"
    kernels.set_enabled(None)


@pytest.fixture
def kernels_on():
    """The fast paths on whatever $RETNET_KERNELS says, for tests of the kernels themselves
    (the rest of the suite passes with RETNET_KERNELS=0 as well)."""
    from retnet import kernels

    kernels.set_enabled(True)
    yield
    kernels.set_enabled(None)


@pytest.fixture
def corpus(tmp_path):
    """A small fixed text corpus of repetitive English (about 40k characters)."""
    import random

    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    lines = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(800)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines))
    return path
