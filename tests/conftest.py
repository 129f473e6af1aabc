"""Shared fixtures: a tiny random-init model for unit tests, the real default model for a few integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_bridge():
    from fis_interventions.models import load_model

    return load_model("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def real_bridge():
    from fis_interventions.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def tokenizer():
    from fis_interventions.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture()
def text_corpus(tmp_path: Path) -> Path:
    """A small varied corpus written on the fly (several documents, informal and formal)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    docs = [
        "Dear Sir or Madam, I am writing to inform you that the quarterly report has been submitted. " * 6,
        "omg that was the best day ever!!! we went to the beach and it was sooo fun, love you all " * 6,
        "The function returns a list of tuples. Each tuple contains the key and the value of one entry. " * 6,
        "I can't believe you did that. I'm so angry right now, honestly, please just call me back. " * 6,
    ]
    for i, doc in enumerate(docs):
        (folder / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    return folder



@pytest.fixture(scope="module")
def bridges(tokenizer):
    """One tiny random-init bridge per model family, built on first use and kept for the module."""
    from fis_interventions.tiny_models import family_bridge

    cache: dict[str, object] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = family_bridge(family, tokenizer)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_bridge) -> Path:
    """A random-init joint checkpoint (seed 0) of the tiny model, for battery tests."""
    from tiny_checkpoints import save_tiny_joint_checkpoint

    return save_tiny_joint_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint", tiny_bridge.tokenizer, seed=0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """One text file of 300 numbered sentences, for small harvests."""
    from tiny_activations import write_numbered_corpus

    return write_numbered_corpus(tmp_path_factory.mktemp("c") / "c.txt")
