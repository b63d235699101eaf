"""The run writes nothing under the user's cache: RETNET_CACHE points at one temporary folder
for the whole session (tests/conftest.py), module-scoped fixtures included, and the compiled
kernels are copied there from where `make kernels` built them instead of being rebuilt."""

import os
import uuid
from pathlib import Path

import pytest

NAME = "private-cache-check"


@pytest.fixture(scope="module")
def tokenised():
    """A corpus no other run has, tokenised in a module-scoped fixture: these are set up before
    any function-scoped fixture, so a per-test cache setting missed them."""
    from retnet.data import Document, tokenize
    from retnet.tokenizer import ByteTokenizer

    tokens, _ = tokenize([Document("doc", f"text of run {uuid.uuid4()}\n" * 3)],
                         ByteTokenizer(), NAME)
    return Path(tokens.filename)


def test_tokenised_data_goes_to_the_private_cache(tokenised, user_cache, tmp_path_factory):
    from retnet.data import cache_dir

    private = Path(os.environ["RETNET_CACHE"])
    assert private.is_relative_to(tmp_path_factory.getbasetemp())
    assert not private.is_relative_to(user_cache) and not user_cache.is_relative_to(private)
    assert tokenised.parent == private == cache_dir() and tokenised.is_file()
    assert not list(user_cache.glob(f"{NAME}-*"))
    assert not list((Path.home() / ".cache" / "retnet").glob(f"{NAME}-*"))


def test_kernels_come_built_from_the_user_cache(user_cache):
    from retnet.kernels import build

    private = Path(os.environ["RETNET_CACHE"])
    for name in build.variants():
        library = build.library_path(name)
        assert library.is_relative_to(private)
        built = user_cache / library.relative_to(private)
        if build._problem(built) is None:  # `make kernels` built it: copied, nothing to do
            assert build._problem(library) is None
            assert library.read_bytes() == built.read_bytes()
