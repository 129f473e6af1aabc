"""SAEs from SAELens in, our SAEs out to SAELens: the folder format of ``SAE.save_model`` / pretrained releases.

A SAELens folder (``cfg.json`` + ``sae_weights.safetensors``) loads as a frozen plain SAE inside a
:class:`~fis_interventions.sae.model.JointSAE` (no integration module), usable wherever one of our checkpoints
is: ``sae_checkpoint:`` of sequential training, ``fis eval``, ``fis screen`` and ``fis battery`` on
``sae.hook_latents``. Its input handling is SAELens': ``apply_b_dec_to_input``; ``normalize_activations``
``none`` or ``expected_average_only_in`` (which SAELens' own ``encode`` does not apply once loaded from disk,
so neither do we); TopK's ``rescale_acts_by_decoder_norm`` is folded into the weights (same latents and
reconstruction, up to float rounding). Per-token input normalisations (``layer_norm``,
``constant_norm_rescale``) and whitening are refused in one line.

Hook names map onto our split points: ``blocks.L.hook_resid_post`` as is, ``blocks.L.hook_resid_pre`` ==
``blocks.(L-1).hook_resid_post`` (the same residual stream value).

:func:`export_saelens` writes our SAE (standalone or a joint model's SAE) as a ``topk`` SAELens folder; the
round trip against SAELens itself is checked by ``bench/saelens_roundtrip.py`` in the SAELens venv.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import FisError
from ..io import atomic_dir
from .model import JointArch, JointSAE, SAEArch

FORMAT = "saelens"
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu")
_INPUT_NORMS = ("none", "expected_average_only_in")
SAELENS_FORMAT_VERSION = "6.0.0"  # the cfg.json layout we write (metadata block); older ones are read too


def is_saelens_folder(path: Path) -> bool:
    """A folder with SAELens' weights file, or a ``cfg.json`` of SAELens' shape (``d_sae``, no ``format``)."""
    path = Path(path)
    if (path / WEIGHTS_FILE).exists():
        return True
    if (path / "weights.safetensors").exists() or not (path / CFG_FILE).exists():
        return False
    try:
        cfg = json.loads((path / CFG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and "d_sae" in cfg and "format" not in cfg


def _read_cfg(file: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FisError(f"cfg.json is not readable JSON ({err})", source=file,
                       fix="point to a folder written by SAELens' SAE.save_model") from None
    if not isinstance(cfg, dict):
        raise FisError("cfg.json must be a JSON object", source=file, fix="point to a SAELens SAE folder")
    return cfg


def _field(cfg: dict[str, Any], name: str) -> Any:
    """SAELens >= 6 keeps model and hook names under ``metadata``; older folders at the top level."""
    meta = cfg.get("metadata") or {}
    if meta.get(name) is not None:
        return meta.get(name)
    return cfg.get(name) if cfg.get(name) is not None else cfg.get({"hook_name": "hook_point"}.get(name, name))


def _architecture(cfg: dict[str, Any], file: Path) -> tuple[str, int | None]:
    arch = cfg.get("architecture")
    k = cfg.get("k")
    if arch is None:  # SAELens < 6: activation_fn_str "relu" / "topk" (with activation_fn_kwargs.k)
        fn = cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu"
        arch = {"relu": "standard", "topk": "topk"}.get(fn, fn)
        k = (cfg.get("activation_fn_kwargs") or {}).get("k", k)
    if arch not in ARCHITECTURES:
        raise FisError(f"SAELens architecture {arch!r} is not supported", source=file, field="architecture",
                       fix=f"use one of: {', '.join(ARCHITECTURES)}")
    if arch == "topk" and not isinstance(k, int):
        raise FisError("a topk SAE needs an integer k", source=file, field="k", fix="set k in cfg.json")
    return arch, k


def saelens_hook(hook_name: str | None, file: Path) -> str:
    """Our split-point name for a SAELens ``hook_name`` (see the module docstring)."""
    if not hook_name:
        raise FisError("cfg.json names no hook", source=file, field="metadata.hook_name",
                       fix="add the hook the SAE was trained on, e.g. blocks.8.hook_resid_pre")
    match = re.fullmatch(r"blocks\.(\d+)\.hook_(resid_pre|resid_post|out)", hook_name)
    if not match:
        raise FisError(f"hook {hook_name!r} is not a residual-stream block boundary, where the toolkit splits "
                       "the model", source=file, field="metadata.hook_name",
                       fix="use an SAE trained on blocks.L.hook_resid_pre or blocks.L.hook_resid_post")
    layer, kind = int(match.group(1)), match.group(2)
    if kind == "resid_pre":
        if layer == 0:
            raise FisError("blocks.0.hook_resid_pre is the embedding output, before any block", source=file,
                           field="metadata.hook_name", fix="use an SAE trained at a later layer")
        layer -= 1
    return f"blocks.{layer}.hook_resid_post"


def load_saelens(path: Path, expect_hook: str | None = None, device: str | torch.device = "cpu") -> Any:
    """Load a SAELens SAE folder as a frozen :class:`~fis_interventions.sae.checkpoint.Checkpoint`."""
    from .checkpoint import Checkpoint

    path = Path(path)
    file = path / CFG_FILE
    if not file.exists():
        raise FisError("SAELens folder has no cfg.json", source=path, field="cfg.json",
                       fix="point to a folder written by SAE.save_model")
    weights_file = path / WEIGHTS_FILE
    if not weights_file.exists():
        raise FisError(f"SAELens folder has no {WEIGHTS_FILE}", source=path, field=WEIGHTS_FILE,
                       fix="copy the weights file next to cfg.json")
    cfg = _read_cfg(file)
    arch, k = _architecture(cfg, file)
    try:
        d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    except (KeyError, TypeError, ValueError):
        raise FisError("cfg.json needs integer d_in and d_sae", source=file, field="d_in",
                       fix="point to a SAELens SAE folder") from None
    norm = cfg.get("normalize_activations", "none") or "none"
    if isinstance(norm, bool):  # SAELens < 6 wrote a flag
        norm = "expected_average_only_in" if norm else "none"
    if norm not in _INPUT_NORMS:
        raise FisError(f"normalize_activations {norm!r} (a per-token or whitening input map) is not supported",
                       source=file, field="normalize_activations",
                       fix="fold it into the weights in SAELens, or use an SAE with 'none'")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise FisError("reshaped (hook_z) SAEs are not supported", source=file, field="reshape_activations",
                       fix="use a residual-stream SAE")
    hook = saelens_hook(_field(cfg, "hook_name"), file)
    if expect_hook is not None and _layer(expect_hook) != _layer(hook):
        raise FisError(f"the SAELens SAE reads {hook}, not {expect_hook}", source=file,
                       field="metadata.hook_name", fix=f"harvest at {hook}, or use an SAE trained at {expect_hook}")
    try:
        state = load_file(str(weights_file), device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise FisError(f"{WEIGHTS_FILE} is not readable ({err})", source=weights_file,
                       fix="copy the weights file again") from None
    needed = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    if arch == "jumprelu":
        needed["threshold"] = (d_sae,)
    for name, shape in needed.items():
        if name not in state:
            raise FisError(f"{WEIGHTS_FILE} has no {name}", source=weights_file, field=name,
                           fix="point to a complete SAELens SAE folder")
        if tuple(state[name].shape) != shape:
            raise FisError(f"{name} has shape {tuple(state[name].shape)}, cfg.json implies {shape}",
                           source=weights_file, field=name, fix="check d_in and d_sae in cfg.json")
    params = {n: state[n].to(torch.float32) for n in needed}
    if arch == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        # latents = topk(pre * |W_dec|), recon = latents / |W_dec| @ W_dec: fold the norms into the weights
        norms = params["W_dec"].norm(dim=-1)
        params["W_enc"] = params["W_enc"] * norms
        params["b_enc"] = params["b_enc"] * norms
        params["W_dec"] = params["W_dec"] / norms.unsqueeze(-1)
    sae_arch = SAEArch(d_in=d_in, d_sae=d_sae, k=k if arch == "topk" else d_sae, normalize_decoder=False,
                       activation={"standard": "relu"}.get(arch, arch),
                       apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)))
    model = JointSAE(JointArch(sae=sae_arch))
    model.sae.load_state_dict(params, strict=True)
    model.requires_grad_(False)
    model.to(device).eval()
    meta = {"format": FORMAT, "architecture": model.cfg.model_dump(mode="json"), "saelens_cfg": cfg,
            "saelens_model_name": _field(cfg, "model_name"), "saelens_hook_name": _field(cfg, "hook_name")}
    return Checkpoint(path=path, model=model, model_name=None, hook=hook, d_in=d_in,
                      normalization={"kind": "none", "scale": 1.0, "mean": None, "std": None},
                      train_config=None, meta=meta)


def fold_input_scale(state: dict[str, torch.Tensor], normalization: dict[str, Any] | None, source: Path
                     ) -> dict[str, torch.Tensor]:
    """The same SAE for inputs scaled by the harvest's ``expected_norm`` factor s (raw x arrives as s * x).

    ``W_enc / s``, ``b_dec * s``, ``W_dec * s``: latents unchanged, reconstruction in the scaled space (so the
    NFM is fitted on the same residual, and splicing inverts the scale as for any of our checkpoints).
    """
    kind = (normalization or {}).get("kind", "none")
    if kind == "none":
        return state
    if kind != "expected_norm":
        raise FisError(f"a SAELens SAE reads raw activations; harvest normalisation {kind!r} cannot be folded in",
                       source=source, field="normalization", fix="harvest with --normalization expected_norm or none")
    s = float(normalization["scale"])  # type: ignore[index]
    return {**state, "W_enc": state["W_enc"] / s, "b_dec": state["b_dec"] * s, "W_dec": state["W_dec"] * s}


def _layer(hook: str) -> int | None:
    match = re.match(r"blocks\.(\d+)\.", hook)
    return int(match.group(1)) if match else None


def export_saelens(checkpoint: Path | str, out: Path | str) -> Path:
    """`fis export --format saelens`: our SAE (or a joint model's SAE) as a SAELens ``topk`` folder.

    The normalisation our SAE was trained with is folded into the weights (SAELens sees raw activations):
    for ``expected_norm`` with scale s, ``W_enc * s``, ``W_dec / s`` and ``b_dec / s`` (SAELens'
    ``fold_activation_norm_scaling_factor``); a ``zscore`` normalisation is not a scalar and is refused.
    """
    from .checkpoint import load_checkpoint

    ckpt = load_checkpoint(Path(checkpoint))
    sae = ckpt.model.sae
    if sae.activation != "topk":
        raise FisError(f"this SAE uses {sae.activation}; only TopK SAEs are exported", source=ckpt.path,
                       field="activation", fix="export an SAE trained with fis train")
    norm = (ckpt.normalization or {}).get("kind", "none")
    if norm not in ("none", "expected_norm"):
        raise FisError(f"normalisation {norm!r} cannot be folded into a SAELens SAE", source=ckpt.path,
                       field="normalization", fix="train with normalization expected_norm (the default)")
    scale = float((ckpt.normalization or {}).get("scale", 1.0)) if norm == "expected_norm" else 1.0
    weights = {"W_enc": sae.W_enc.detach().float() * scale, "W_dec": sae.W_dec.detach().float() / scale,
               "b_enc": sae.b_enc.detach().float(), "b_dec": sae.b_dec.detach().float() / scale}
    if not sae.apply_b_dec_to_input:
        raise FisError("SAE does not subtract b_dec from its input", source=ckpt.path, field="apply_b_dec_to_input",
                       fix="export an SAE trained with fis train")
    cfg = {"architecture": "topk", "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
           "metadata": {"model_name": ckpt.model_name, "hook_name": ckpt.hook,
                        "sae_lens_version": SAELENS_FORMAT_VERSION, "exported_by": "fis-interventions",
                        "source_checkpoint": str(ckpt.path)}}
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FisError("output folder already exists and is not empty", source=out, field="out",
                       fix="choose a new folder")
    with atomic_dir(out) as tmp:
        save_file({n: t.contiguous().cpu() for n, t in weights.items()}, str(tmp / WEIGHTS_FILE))
        (tmp / CFG_FILE).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return out


EXPORT_FORMATS = ("saelens",)


def export(checkpoint: Path | str, out: Path | str, format: str = "saelens") -> Path:  # noqa: A002 - CLI name
    """Python API of `fis export CKPT --format saelens --out DIR`."""
    if format not in EXPORT_FORMATS:
        raise FisError(f"unknown export format {format!r}", field="format", fix=f"use one of: {', '.join(EXPORT_FORMATS)}")
    return export_saelens(checkpoint, out)
