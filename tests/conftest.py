import os
import sys
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

# The reference and helpers beside the tests are imported as a plain module.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Tokenised-data caches go to a per-session temp folder, never the user's home."""
    monkeypatch.setenv("RETNET_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


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
