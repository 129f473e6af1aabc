"""What is written next to every output so that a result can be reproduced: versions, seed, git hash."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import random
import subprocess
from pathlib import Path
from typing import Any

_PACKAGES = ("fis-interventions", "torch", "transformer-lens", "transformers", "numpy", "pandas", "scipy",
             "statsmodels", "pingouin", "safetensors", "pydantic", "gguf")


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour changes our numbers."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def git_hash(path: Path | None = None) -> str | None:
    """The commit of the source tree (None outside a git checkout), with '-dirty' for local changes."""
    root = path or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def check_seed(seed: Any, field: str = "seed") -> None:
    """A seed outside 0 .. 2**32 - 1 (or a boolean) is a one-line error: numpy refuses negative seeds, torch
    wraps huge ones silently."""
    from .errors import FisError

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**32 - 1:
        raise FisError(f"seed {seed!r} is out of range", field=field, fix="use a whole number from 0 to 4294967295")


def seed_everything(seed: int) -> None:
    """Seed every RNG we use; CPU runs are then bit-for-bit repeatable. A seed outside 0 .. 2**32 - 1 (or a
    boolean) is a one-line error: numpy refuses negative seeds and torch wraps huge ones silently."""
    import numpy as np
    import torch

    check_seed(seed)

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def provenance(seed: int | None = None, config: Any = None) -> dict[str, Any]:
    """One dict to store beside an output."""
    out: dict[str, Any] = {"versions": library_versions(), "git": git_hash(), "host": platform.node(),
                           "platform": platform.platform(), "threads": os.cpu_count()}
    if seed is not None:
        out["seed"] = seed
    if config is not None:
        out["config"] = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    return out
