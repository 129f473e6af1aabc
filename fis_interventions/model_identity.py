"""A model's identity by content, so that outputs are tied to the model, not to the folder it sat in.

A model given by path (a Hugging Face folder or a ``.gguf`` file) is named by its absolute path in manifests,
checkpoints and run folders; beside it they record ``model_sha256``: the sha256 of the files that decide its
numbers (weights, config, tokenizer; or the GGUF file's bytes). Two outputs are of the same model when their
digests agree, wherever the model lies: an identical copy at another path is accepted, another model at the
same path is refused. Built-in models (``smollm2-135m``, ``tiny-random``) are identified by their name (the
package pins them) and record no digest.

Hashing SmolLM2-135M's 542 MB folder took 0.77 s (1.2 ms once remembered): each file's digest is remembered per (absolute path, size, mtime) in
``$FIS_CACHE/models/.digests``, so later runs pay a ``stat`` per file. Outputs written before this field existed
have no digest: they are matched by path, as before, with a warning saying so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import FisError
from .fingerprint import file_digest

log = logging.getLogger(__name__)

# the files of a Hugging Face folder that decide the model's numbers and its tokens (not READMEs, generation
# settings or anything a user keeps beside them)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                    "vocab.txt", "special_tokens_map.json", "added_tokens.json")
# config keys that say who wrote the file, not what the model computes (a re-save by another transformers
# version changes them)
_CONFIG_NOISE = ("transformers_version", "_name_or_path")


@dataclass(frozen=True)
class ModelId:
    """What an output records of its model: the name (built-in name or absolute path) and the content digest."""

    name: str | None
    sha256: str | None = None

    def describe(self) -> str:
        return f"{self.name!r} (sha256 {self.sha256[:12]})" if self.sha256 else repr(self.name)


def cached_file_digest(path: Path) -> str:
    """sha256 of a file's bytes, remembered per (absolute path, size, mtime): a changed file is hashed again."""
    path = Path(path)
    stat = path.stat()
    seen = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    memo = _memo_folder() / hashlib.sha1(seen.encode()).hexdigest()
    try:
        if memo.is_file():
            value = memo.read_text().strip()
            if len(value) == 64:
                return value
    except OSError:
        pass
    digest = file_digest(path)
    try:  # a cache that cannot be written only costs the hash again next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp.write_text(digest)
        os.replace(tmp, memo)
    except OSError:
        pass
    return digest


def _memo_folder() -> Path:
    from .models import cache_dir

    return cache_dir() / "models" / ".digests"


def model_files(folder: Path) -> list[Path]:
    """The files of a HF folder that the content digest covers: weights (every safetensors / bin shard and
    their index), ``config.json`` and the tokenizer's files."""
    folder = Path(folder)
    weights = [p for p in folder.iterdir() if p.is_file() and (
        p.suffix == ".safetensors" or p.name.endswith(".safetensors.index.json")
        or (p.name.startswith("pytorch_model") and (p.suffix == ".bin" or p.name.endswith(".bin.index.json"))))]
    named = [folder / n for n in ("config.json", *_TOKENIZER_FILES) if (folder / n).is_file()]
    return sorted(set(weights + named), key=lambda p: p.name)


def content_digest(path: Path) -> str:
    """The content identity of a model folder or ``.gguf`` file (see the module docstring)."""
    path = Path(path)
    if path.is_file():
        return cached_file_digest(path)
    h = hashlib.sha256()
    for file in model_files(path):
        if file.name == "config.json":
            digest = _config_digest(file)
        else:
            digest = cached_file_digest(file)
        h.update(f"{file.name}\0{digest}\n".encode())
    return h.hexdigest()


def _config_digest(file: Path) -> str:
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return cached_file_digest(file)
    if isinstance(cfg, dict):
        for key in _CONFIG_NOISE:
            cfg.pop(key, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def of_bridge(bridge: Any) -> ModelId:
    """The identity of a loaded model (``load_model`` computes the digest of path models)."""
    from .models import model_name

    return ModelId(model_name(bridge), getattr(bridge, "fis_model_sha256", None))


def of_source(name_or_path: str) -> ModelId:
    """The identity of a model before loading it (resolving the name; hashing a path model's files)."""
    from .models import DEFAULT_MODEL, TINY_MODEL, resolve_model

    if name_or_path in (DEFAULT_MODEL, TINY_MODEL):  # named, not hashed: nothing to resolve (or convert) yet
        return ModelId(name_or_path)
    source = resolve_model(name_or_path)
    return ModelId(source.name, source.sha256)


def of_record(record: dict[str, Any], name_key: str = "model_name") -> ModelId:
    """The identity an output recorded: ``cfg.json`` of a checkpoint (``model_name``), a manifest or a
    ``run.json`` (``model``), each with ``model_sha256`` beside it when written by a version that records it."""
    name = record.get(name_key)
    return ModelId(None if name is None else str(name), record.get("model_sha256"))


def of_checkpoint(ckpt: Any) -> ModelId:
    """The model a loaded checkpoint records (a SAELens SAE records none: name None)."""
    return ModelId(ckpt.model_name, (ckpt.meta or {}).get("model_sha256"))


def key(model: ModelId) -> str:
    """What fingerprints record of a model: its content digest when it has one (a moved or copied model keeps
    its runs resumable), else its name."""
    return f"sha256:{model.sha256}" if model.sha256 else str(model.name)


def same_model(recorded: ModelId, actual: ModelId) -> bool:
    """Whether ``actual`` is the model an output recorded: digests compared when both have one, else names."""
    if recorded.sha256 and actual.sha256:
        return recorded.sha256 == actual.sha256
    return recorded.name == actual.name


def check_same_model(recorded: ModelId, actual: ModelId, *, source: Path | str, what: str = "checkpoint",
                     field: str = "model") -> None:
    """Refuse (one line naming the output, the recorded model and the fix) a model that is not the one
    ``what`` was made with; accept an identical copy at another path. An output without a digest is matched
    by path, with a warning (a copy of its model elsewhere cannot be recognised)."""
    if recorded.name is None:  # a SAELens SAE: no model recorded (checked elsewhere by d_model and hook)
        return
    if same_model(recorded, actual):
        if recorded.sha256 and recorded.name != actual.name:
            log.info("%s %s: model %s has the content of %s, the model it was trained on", what, source,
                     actual.name, recorded.name)
        elif not recorded.sha256 and actual.sha256:
            log.warning("%s %s records no content hash of its model (written by an older fis): matched by path "
                        "only", what, source)
        return
    if recorded.sha256 and actual.sha256 and recorded.name == actual.name:
        raise FisError(f"{what} was trained on model {recorded.describe()}, but the model at that path now has "
                       f"sha256 {actual.sha256[:12]} (its weights, config or tokenizer changed)", source=source,
                       field=field, fix=f"restore the model the {what} was trained on (or a copy of it, anywhere), "
                       f"or retrain on this model")
    note = "" if recorded.sha256 or not actual.sha256 else (
        f"; the {what} records no content hash (written by an older fis), so only the same path is accepted")
    raise FisError(f"{what} was trained on model {recorded.describe()}, not {actual.describe()}{note}",
                   source=source, field=field, fix=f"load the model the {what} was trained on"
                   f"{' (or an identical copy of it, anywhere)' if recorded.sha256 else ''}, "
                   f"or use a {what} trained on this one")


def model_to_load(recorded: str | None, given: str | None, *, source: Path | str, flag: str = "--model",
                  default: str | None = None) -> str:
    """The model a stage loads for an output that recorded ``recorded``: ``given`` when the user named one
    (checked by content afterwards), else the recorded one; a recorded path that is gone (the model was moved)
    is one line saying which model to pass, before anything is loaded."""
    if given is not None:
        return given
    name = recorded or default
    if name is None:
        raise FisError("the checkpoint does not record its model", source=source, field="model",
                       fix=f"pass {flag}")
    from .models import DEFAULT_MODEL, TINY_MODEL

    if name not in (DEFAULT_MODEL, TINY_MODEL) and Path(name).is_absolute() and not Path(name).exists():
        raise FisError(f"the model it was trained on, {name}, is not there any more", source=source,
                       field="model", fix=f"pass {flag} with that model or an identical copy of it (checked by "
                       "content)")
    return name
