"""Text sources and their tokenisation into fixed-length contexts.

Sources: plain-text files, folders of ``.txt``/``.md`` files, JSONL files with a ``text`` field, a Hugging
Face dataset name (``hf:NAME[:SPLIT]``, only when ``datasets`` is installed and the data is cached: we never
download), and the embedded ``default`` corpus.

The default corpus needs no download: CPython's ``pydoc_data`` topics (the language reference behind
``help()``) plus the docstrings of standard-library modules. It is real English prose, but technical, formal
and neutral: real studies should pass their own, register-varied corpus.

Contexts: documents are joined into one stream with the EOS token between them and cut into contexts of
``context_length`` tokens; every context starts with BOS (so position 0 is always BOS, explicitly), the rest is
``context_length - 1`` stream tokens. BOS/EOS/pad positions are later excluded from harvesting.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import FisError

DEFAULT_CORPUS = "default"
_MIN_DOC_CHARS = 200


def _pydoc_topics() -> Iterator[str]:
    from pydoc_data import topics

    for key in sorted(topics.topics):
        yield topics.topics[key]


def _stdlib_docstrings() -> Iterator[str]:
    """Module, class and function docstrings of the pure-Python standard library, parsed without importing."""
    stdlib = Path(sys.modules["json"].__file__).resolve().parent.parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(stdlib)]) if not m.name.startswith(("_", "test")))
    for name in names:
        path = stdlib / f"{name}.py"
        if not path.exists():
            path = stdlib / name / "__init__.py"
        if not path.exists():
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= _MIN_DOC_CHARS:
                    yield doc


def default_documents() -> Iterator[str]:
    """The embedded default corpus (see module docstring)."""
    yield from _pydoc_topics()
    yield from _stdlib_docstrings()


def _jsonl_documents(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise FisError(f"line {lineno}: invalid JSON ({err.msg})", source=path) from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise FisError(f"line {lineno}: each JSON line needs a string 'text' field", source=path,
                               field="text")
            yield record["text"]


def _hf_documents(spec: str) -> Iterator[str]:
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError:
        raise FisError("Hugging Face datasets are not installed", field="corpus",
                       fix="pip install datasets, or pass a local text/JSONL corpus") from None
    parts = spec.split(":")
    name, split = parts[1], (parts[2] if len(parts) > 2 else "train")
    try:
        ds = datasets.load_dataset(name, split=split, streaming=False)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "not available offline"
        raise FisError(f"dataset '{name}' is not available offline ({type(err).__name__})", field="corpus",
                       fix="pass a local text or JSONL corpus") from None
    for record in ds:
        yield record["text"]


def iter_documents(source: str | Path) -> Iterator[str]:
    """Yield the documents of one corpus source (see module docstring for the kinds)."""
    text_source = str(source)
    if text_source == DEFAULT_CORPUS:
        yield from default_documents()
        return
    if text_source.startswith("hf:"):
        yield from _hf_documents(text_source)
        return
    path = Path(text_source).expanduser()
    if not path.exists():
        raise FisError("corpus not found", source=path, field="corpus",
                       fix="pass a .txt/.md file, a folder of them, a .jsonl file, or 'default'")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".md", ".jsonl"} and p.is_file())
        for file in files:
            yield from iter_documents(file)
        return
    if path.suffix == ".jsonl":
        yield from _jsonl_documents(path)
        return
    try:
        yield path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FisError("not valid UTF-8", source=path, fix="save the corpus as UTF-8") from None


def describe(sources: list[str]) -> str:
    """Human-readable description stored in manifests."""
    if sources == [DEFAULT_CORPUS]:
        return "default: CPython pydoc_data topics + stdlib docstrings (technical, formal English)"
    return " + ".join(sources)


@dataclass
class ContextBatcher:
    """Cuts a token stream into BOS-led contexts of fixed length, deterministically."""

    tokenizer: Any
    context_length: int = 128

    def contexts(self, sources: list[str], max_contexts: int | None = None) -> torch.Tensor:
        """All contexts as an int64 tensor [n_contexts, context_length]; raises on an empty corpus."""
        if self.context_length < 2:
            raise FisError("context_length must be at least 2", field="context_length")
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        if bos is None or eos is None:
            raise FisError("the tokenizer has no BOS or EOS token", field="tokenizer")
        body = self.context_length - 1
        stream: list[int] = []
        rows: list[list[int]] = []
        n_docs = 0
        for source in sources:
            for doc in iter_documents(source):
                doc = doc.strip()
                if not doc:
                    continue
                n_docs += 1
                stream.extend(self.tokenizer(doc, add_special_tokens=False)["input_ids"])
                stream.append(eos)
                while len(stream) >= body:
                    rows.append([bos, *stream[:body]])
                    del stream[:body]
                    if max_contexts is not None and len(rows) >= max_contexts:
                        return torch.tensor(rows, dtype=torch.long)
        if not rows:
            what = "no text" if n_docs == 0 else f"fewer than {body} tokens"
            raise FisError(f"corpus {describe(sources)} has {what}", field="corpus",
                           fix="pass more text (or a smaller --context-length)")
        return torch.tensor(rows, dtype=torch.long)
