"""Small harvests the tests train and evaluate on (a helper module, not a test file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def harvest_sentences(root: Path, bridge: Any, sentence: str, n: int, model: str = "tiny-random",
                      hook: str = "blocks.1.hook_resid_post", **harvest_kwargs: Any) -> Path:
    """Write ``n`` numbered sentences (``sentence`` with ``{i}``) to ``root/c.txt`` and harvest ``bridge``'s
    activations at ``hook`` over them into ``root/acts`` (no progress bar); returns that folder."""
    from fis_interventions.activations import harvest

    corpus = root / "c.txt"
    corpus.write_text(" ".join(sentence.format(i=i) for i in range(n)))
    harvest(bridge=bridge, model=model, hook=hook, corpus=[str(corpus)], out=root / "acts", progress=False,
            **harvest_kwargs)
    return root / "acts"
