"""Attribution of the battery's readout contrast to every feature: what clamping it would do, estimated.

Why this exists: the activation screen ranks what a feature *responds to*; the question is what it *does to
the output*. Clamping every feature (4608 + 64 + 256 on the demo) through the battery costs one suffix pass
per feature and condition; attribution patching (Nanda 2023; Syed et al. 2023; Marks et al. 2024) estimates
all of them from one forward and one backward pass per stimulus batch.

What is estimated: the battery's edit of feature ``j`` at point ``p`` to the value ``c`` (at every kept
position, ``where: all``) changes the readout contrast ``C`` (exactly the battery's: same prompts, readout
position, target sets, score and contrast; :class:`~fis_interventions.interventions.battery.Readouts`) by

    dC_j(c) ~= sum_t  dC/df_j(t) * (c - f_j(t))  =  c * A_j - B_j,
    A_j = sum_t G_j(t),   B_j = sum_t G_j(t) f_j(t),   G_j(t) = dC/df_j(t)

over the kept positions ``t`` of a stimulus row. ``G`` comes from ONE backward pass of the suffix (blocks
after the hook, norm, unembedding at the readout position) to the joint model's reconstruction ``r`` (the
battery adds ``invert_delta(r_edited - r)`` to the clean residual, so ``g = dC/dr`` is taken at the clean run),
then in closed form through the joint model (no autograd through it, every latent at once, active or not):

* ``sae.hook_latents``: ``G = g (W_dec + W_lin)^T + (g_bi * s) V^T - f * (g_bi (V*V)^T)`` with ``s = f V`` and
  ``g_bi = ((g W_out) * [hidden > 0]) W_in`` (the bi-interaction pooling is linear in each single latent);
* ``nfm.hook_hidden``: ``G = g W_out`` (the NFM output layer is linear);
* ``secondary.hook_latents``: ``G = (g W_out) W_dec_sec^T`` (its edit enters as ``hidden + decode(edited) -
  decode(original)``).

Clamp kinds map onto ``A`` and ``B``: ``set c`` / ``zero`` -> ``c A - B``, ``scale s`` -> ``(s - 1) B``,
``add a`` -> ``a A``. Integrated gradients (``ig``, Sundararajan et al. 2017, as in Marks et al. 2024) replace
``G`` by its mean over ``steps`` midpoints of the straight path that moves every feature of the point together
from the clean value towards the clamp (zero ablation): the suffix is run at each point of the path, so the
estimate follows the model's curvature; it costs ``steps`` forward+backward passes per point.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import FisError

METHODS = ("activation", "attribution", "ig")
GRADIENT_METHODS = ("attribution", "ig")
PRECISIONS = ("float32", "bfloat16")  # of the suffix's forward + backward (the screen's cost); see check_precision
POSITION_CHUNK = 256  # kept positions per dense [positions, d_sae] gradient block (memory bound)
# screen batches are merged for the suffix's forward + backward up to this many padded tokens: with short stimuli
# (6 tokens x 16 rows) the per-layer cost of tiny matrix products weighs, and one float32 pass over 3 merged
# batches took 1.08 s instead of 1.20 s on the demo (docs/attribution.md); memory stays that of a 512-token batch
SUFFIX_TOKENS = 512


def parse_methods(spec: str | Sequence[str]) -> list[str]:
    """``"activation,attribution"`` -> ``["activation", "attribution"]``; one line naming ``--method`` if bad."""
    parts = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in str(s).split(",")]
    methods = list(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if not methods:
        raise FisError("--method is empty", field="--method", fix=f"use one or more of: {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise FisError(f"unknown --method {m!r}", field="--method",
                           fix=f"use one or more of {', '.join(METHODS)}, comma-separated "
                               "(e.g. --method activation,attribution)")
    return methods


def check_steps(steps: int) -> int:
    if not isinstance(steps, int) or steps < 1:
        raise FisError(f"--steps must be >= 1, got {steps}", field="--steps",
                       fix="use e.g. --steps 16 (the number of integrated-gradient points)")
    return steps


def check_precision(precision: str, device: torch.device | str | None = None) -> str:
    """The suffix's precision, checked: one line naming ``--precision`` if unknown or if ``device`` (when given)
    cannot run bfloat16 matrix products.

    Why an option and ``float32`` the default: the suffix's forward and backward are most of the attribution
    screen's cost, and bfloat16 (autocast: matrix products in bfloat16 with float32 accumulation, the residual
    stream and norms in float32) roughly halves them where the hardware has bfloat16 units (CPUs with AVX512-BF16
    or AMX, CUDA GPUs from Ampere on). The estimates then differ from float32's by ~1% of their range (measured
    on the demo checkpoint: docs/attribution.md), far less than the first-order estimate differs from a real
    clamp; but a screen rerun elsewhere must give the same numbers, so the faster, rounder path is asked for,
    not chosen by the hardware."""
    if precision not in PRECISIONS:
        raise FisError(f"unknown --precision {precision!r}", field="--precision",
                       fix=f"use {' or '.join(PRECISIONS)}")
    if precision == "bfloat16" and device is not None and torch.device(device).type == "cuda" \
            and not torch.cuda.is_bf16_supported():
        raise FisError("--precision bfloat16: this GPU has no bfloat16 support", field="--precision",
                       fix="use --precision float32")
    return precision


def precision_warnings(precision: str, device: torch.device) -> list[str]:
    """A warning where bfloat16 is emulated (a CPU without AVX512-BF16 / AMX): correct, but slower than float32."""
    if precision != "bfloat16" or device.type != "cpu":
        return []
    cpu = torch.cpu
    native = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or \
        getattr(cpu, "_is_amx_tile_supported", lambda: False)()
    return [] if native else ["--precision bfloat16: this CPU has no bfloat16 units (AVX512-BF16 / AMX), so the "
                              "screen is likely slower than with float32"]


def clamp_label(value: float) -> str:
    """Column label of a clamp value: ``zero`` for 0, else ``set_<value>`` (``set_-2.5``)."""
    return "zero" if value == 0 else f"set_{value:g}"


def choose_contrast(design: Any, contrast: str | None) -> str:
    """The readout contrast attributed: the named one, or the design's first; one line if there is none."""
    names = list(design.readout.contrasts)
    if not names:
        raise FisError("the design's readout has no contrast to attribute", source=design.source,
                       field="readout.contrasts",
                       fix="add e.g. `contrasts: {pos_minus_neg: positive - negative}` to the readout, or use "
                           "--method activation")
    if contrast is None:
        return names[0]
    if contrast not in names:
        raise FisError(f"--contrast {contrast!r} is not a contrast of the design", source=design.source,
                       field="--contrast", fix=f"use one of: {', '.join(names)}")
    return contrast


@contextmanager
def _frozen(module: Any) -> Iterator[None]:
    """The model's weights without ``requires_grad`` for the duration: the backward pass then computes (and
    the forward keeps tensors for) the residual's gradient only, not the weights'. Restored afterwards."""
    params = [p for p in module.parameters() if p.requires_grad] if hasattr(module, "parameters") else []
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _suffix_with_grad(split: Any, resid: torch.Tensor, state: Any, positions: torch.Tensor,
                      vocab: torch.Tensor | None = None) -> torch.Tensor:
    """:meth:`SplitModel.suffix` with autograd on (the public one is ``no_grad``): the same code path."""
    return type(split).suffix.__wrapped__(split, resid, state, positions, vocab)


class LowPrecisionWeights:
    """bfloat16 copies of the suffix blocks' linear weights, cast once and swapped in while the suffix runs.

    Why: under autocast every linear layer casts its float32 weight to bfloat16 on every call; on the demo those
    casts made the bfloat16 suffix 0.73 s instead of 0.56 s (the products themselves are small at a screen's
    batch sizes). The swap lasts the ``with`` block only: the model's own float32 parameters are
    put back on exit, also after an error. The generic split path (any other architecture) keeps autocast's casts.
    """

    def __init__(self, split: Any) -> None:
        adapter = getattr(split, "adapter", None)
        self.swaps: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
        layers = getattr(adapter, "layers", None)
        if layers is None or split.blocks_before is None:
            return
        with torch.no_grad():
            for i in range(split.blocks_before, adapter.n_layers):
                for module in layers[i].modules():
                    if isinstance(module, torch.nn.Linear):
                        for name in ("weight", "bias"):
                            value = getattr(module, name, None)
                            if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
                                self.swaps.append((module, name, value.detach().to(torch.bfloat16)))
        self._saved: list[Any] = []

    def __enter__(self) -> LowPrecisionWeights:
        self._saved = []
        for module, name, low in self.swaps:
            self._saved.append(module._parameters[name])
            module._parameters[name] = torch.nn.Parameter(low, requires_grad=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        for (module, name, _), original in zip(self.swaps, self._saved, strict=True):
            module._parameters[name] = original
        self._saved = []


@dataclass
class PointTerms:
    """Per stimulus row and feature of one point: ``A = sum_t G`` and ``B = sum_t G f`` (see module doc)."""

    A: torch.Tensor  # [rows, width]
    B: torch.Tensor  # [rows, width]


def contrast_grad(attached: Any, prep: Any, readouts: Any, contrast: str, resid: torch.Tensor | None = None,
                  precision: str = "float32", positions: torch.Tensor | None = None,
                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g, C)``: ``dC/dr`` [n_kept, d_in] in the joint model's space, and the contrast [rows] at ``resid``
    (default: the clean residual of ``prep``). One suffix forward and backward, logits at the readout only;
    ``precision="bfloat16"`` runs them under bfloat16 autocast (:func:`check_precision`). ``positions`` [B, P]:
    several readouts per sequence (packed rows; ``valid`` [B, P] marks the real ones): ``g`` is then the gradient
    of their sum and ``C`` is [B, P]."""
    split, splice = attached.split, attached.splice
    base = prep.resid if resid is None else resid
    b, t, d = base.shape
    with torch.enable_grad(), _frozen(split.bridge):
        dr = torch.zeros_like(prep.x, requires_grad=True)
        delta = splice.normalizer.invert_delta(dr).to(base.dtype)
        flat = base.reshape(b * t, d).index_add(0, prep.keep_idx, delta)
        columns = readouts.contrast_columns(base.device)  # only the target words' columns of the unembedding
        at = prep.enc.readout.unsqueeze(1) if positions is None else positions
        with torch.autocast(base.device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            logits = _suffix_with_grad(split, flat.view(b, t, d), prep.state, at, columns)
        logits = logits.reshape(-1, logits.shape[-1])  # [B * P, columns]
        con = readouts.contrast_scores(logits.float()) if columns is not None else readouts.scores(logits)[1]
        value = con[contrast]
        if valid is not None:
            value = value * valid.reshape(-1).to(value.dtype)
        (g,) = torch.autograd.grad(value.sum(), dr)
    value = value.detach().float()
    return g.detach().float(), (value if positions is None else value.view(at.shape))


def merge_prepared(split: Any, preps: Sequence[Any], pad_id: int = 0) -> Any:
    """Several prepared batches as one, right-padded to the longest: for one suffix pass over all of them.

    Kept positions keep their order (batch after batch), so the gradient of the merged batch splits back into
    the batches' own by their counts of kept positions. Right padding and the causal mask leave every real
    position's value as it was in its own batch (tests: the estimates equal the unmerged ones)."""
    from .interventions.battery import Encoded, Prepared

    if len(preps) == 1:
        return preps[0]
    width = max(p.resid.shape[1] for p in preps)

    def pad(t: torch.Tensor, value: Any = 0) -> torch.Tensor:  # [B, T, ...] -> [B, width, ...]
        extra = width - t.shape[1]
        if not extra:
            return t
        return torch.cat([t, t.new_full((t.shape[0], extra, *t.shape[2:]), value)], dim=1)

    keep, offset = [], 0
    for p in preps:
        t = p.resid.shape[1]
        keep.append((torch.div(p.keep_idx, t, rounding_mode="floor") + offset) * width + p.keep_idx % t)
        offset += p.resid.shape[0]
    enc = Encoded(torch.cat([pad(p.enc.tokens, pad_id) for p in preps]),
                  torch.cat([pad(p.enc.mask) for p in preps]), torch.cat([p.enc.readout for p in preps]),
                  torch.cat([pad(p.enc.stimulus_mask, False) for p in preps]))
    return Prepared(enc, torch.cat([pad(p.resid) for p in preps]), split.state_for(enc.tokens, enc.mask),
                    torch.cat(keep), torch.cat([p.x for p in preps]),
                    {k: torch.cat([p.where[k] for p in preps]) for k in preps[0].where})


@dataclass
class PackedRows:
    """Rows of one stimulus (its prompts) as one sequence: the token prefix they share once, then each row's tail
    (:class:`~fis_interventions.splice.Packing`); ``readout`` the packed position of each row's readout."""

    rows: list[int]  # indices into the Attributor's rows, in tail order
    tokens: list[int]
    positions: list[int]
    segments: list[int]
    readout: list[int]


def pack_rows(rows: list[int], seqs: list[list[int]], readouts: list[int]) -> PackedRows:
    """Pack token sequences (BOS first) that share a prefix: the longest common prefix once (segment 0), then each
    sequence's remainder (segment k) at the positions it has in its own sequence. A readout inside the shared
    prefix keeps its position."""
    shared = 0
    while all(len(q) > shared for q in seqs) and len({q[shared] for q in seqs}) == 1:
        shared += 1
    tokens, positions, segments = list(seqs[0][:shared]), list(range(shared)), [0] * shared
    readout = []
    for k, (q, r) in enumerate(zip(seqs, readouts, strict=True)):
        start = len(tokens)
        tail = q[shared:]
        tokens += tail
        positions += range(shared, shared + len(tail))
        segments += [k + 1] * len(tail)
        readout.append(r if r < shared else start + r - shared)
    return PackedRows(rows, tokens, positions, segments, readout)


def _padded_tokens(preps: Sequence[Any]) -> int:
    """Tokens of ``preps`` merged: rows x the longest row (what one suffix pass over them computes)."""
    return sum(p.resid.shape[0] for p in preps) * max(p.resid.shape[1] for p in preps)


def _row_sums(G: torch.Tensor, f: torch.Tensor, row_of: torch.Tensor, n_rows: int, out: PointTerms | None
              ) -> PointTerms:
    A = G.new_zeros(n_rows, G.shape[1]).index_add_(0, row_of, G)
    B = G.new_zeros(n_rows, G.shape[1]).index_add_(0, row_of, G * f)
    if out is None:
        return PointTerms(A, B)
    out.A += A
    out.B += B
    return out


@torch.no_grad()
def joint_values(attached: Any, x: torch.Tensor, edit: dict[str, Any] | None = None) -> Any:
    """The joint model's forward (``full`` when it has an NFM) at the kept inputs, optionally edited."""
    joint = attached.joint
    return joint(x, "full" if joint.nfm is not None else "sae", edit=edit)


@dataclass
class ClosedForm:
    """The joint model's products the SAE point's closed form reuses in every batch: ``W_dec + W_lin`` and
    ``V * V`` (computed once per screen, not per batch: at d_sae x d_in they are the largest temporaries)."""

    W: torch.Tensor  # [d_sae, d_in]
    VV: torch.Tensor | None  # [d_sae, emb]

    @classmethod
    @torch.no_grad()
    def of(cls, joint: Any) -> ClosedForm:
        nfm = joint.nfm
        return cls(joint.sae.W_dec if nfm is None else joint.sae.W_dec + nfm.W_lin,
                   None if nfm is None else nfm.V * nfm.V)


@torch.no_grad()
def point_terms(attached: Any, g: torch.Tensor, out: Any, points: Sequence[str], row_of: torch.Tensor,
                n_rows: int, closed: ClosedForm | None = None) -> dict[str, PointTerms]:
    """``A`` and ``B`` of every feature of every point from ``g = dC/dr`` and the joint forward ``out``
    (closed form through the joint model, see the module docstring); dense blocks of ``POSITION_CHUNK``
    positions so memory stays bounded for any d_sae. ``closed``: :class:`ClosedForm` of the joint model, if
    already computed."""
    joint = attached.joint
    nfm, sec = joint.nfm, joint.secondary
    g = g.to(next(joint.parameters()).dtype)
    terms: dict[str, PointTerms] = {}
    g_hidden = g @ nfm.mlp_out.weight if nfm is not None else None  # [n, hidden]: dC/d(hidden)
    if "sae.hook_latents" in points:
        closed = closed if closed is not None else ClosedForm.of(joint)
        W, VV = closed.W, closed.VV
        acc: PointTerms | None = None
        for s0 in range(0, len(g), POSITION_CHUNK):
            sl = slice(s0, s0 + POSITION_CHUNK)
            lat = out.latents
            f = lat.values.new_zeros(len(lat.values[sl]), lat.d_sae).scatter(-1, lat.indices[sl], lat.values[sl])
            G = g[sl] @ W.T
            if nfm is not None:
                s = f @ nfm.V  # [c, emb] = sum_i f_i V_i
                live = (out.hidden[sl] > 0).to(G.dtype)  # the ReLU units that pass a change of bi
                g_bi = (g_hidden[sl] * live) @ nfm.mlp_in.weight  # [c, emb]
                G += (g_bi * s) @ nfm.V.T - f * (g_bi @ VV.T)
            acc = _row_sums(G, f, row_of[sl], n_rows, acc)
        terms["sae.hook_latents"] = acc if acc is not None else PointTerms(
            g.new_zeros(n_rows, joint.sae.d_sae), g.new_zeros(n_rows, joint.sae.d_sae))
    if "nfm.hook_hidden" in points:
        terms["nfm.hook_hidden"] = _row_sums(g_hidden, out.hidden, row_of, n_rows, None)
    if "secondary.hook_latents" in points:
        G = g_hidden @ sec.W_dec.T
        terms["secondary.hook_latents"] = _row_sums(G, out.secondary_latents.dense(), row_of, n_rows, None)
    return terms


def _scale_edit(alpha: float) -> Any:
    """Every feature of the point scaled by ``1 - alpha`` (the integrated-gradient path of zero ablation)."""
    def fn(value: torch.Tensor) -> torch.Tensor:
        return value * (1.0 - alpha)
    return fn


def _on_copy_one(fn: Any, n: int) -> Any:
    """An edit of copy 1 of two stacked copies (copy 0 clean), for :meth:`JointSplice.stacked_deltas`."""
    def stacked(value: torch.Tensor) -> torch.Tensor:
        return torch.cat([value[:n], fn(value[n:])])
    return stacked


@dataclass
class AttributionResult:
    """Per-stimulus-row estimates: ``A[point]`` and ``B[point]`` [n_rows, width] (numpy), the clean contrast
    per row, the rows (design x prompt, discovery items) and what was attributed."""

    rows: pd.DataFrame
    A: dict[str, np.ndarray]
    B: dict[str, np.ndarray]
    clean: np.ndarray
    contrast: str
    method: str
    steps: int | None = None
    warnings: list[str] = field(default_factory=list)
    precision: str = "float32"
    # rows packed per stimulus (Attributor(pack=True)): each row's A and B are its stimulus' mean over its rows
    # (exactly what the screen averages to), not the row's own
    packed: bool = False

    def estimate(self, point: str, kind: str = "set", value: float = 0.0) -> np.ndarray:
        """The estimated contrast shift [n_rows, width] of clamping each feature (battery condition)."""
        A, B = self.A[point], self.B[point]
        if kind in ("set", "zero"):
            return value * A - B
        if kind == "scale":
            return (value - 1.0) * B
        if kind == "add":
            return value * A
        raise FisError(f"unknown clamp kind {kind!r}", field="kind", fix="use set, zero, scale or add")


class Attributor:
    """Accumulates the per-row estimates batch by batch, so a caller that already runs the prefix (the activation
    screen, :func:`fis_interventions.screening.collect`) can hand its pass over instead of running a second one.

    Construction checks everything that can be refused before any model work: the method, ``steps``, the
    contrast, the readout's ``multi_token`` and the target words (one line, exit 2)."""

    def __init__(self, attached: Any, design: Any, rows: pd.DataFrame, points: Sequence[str],
                 contrast: str | None = None, method: str = "attribution", steps: int = 16,
                 precision: str = "float32", pack: bool = False) -> None:
        from .interventions.battery import Readouts

        if method not in GRADIENT_METHODS:
            raise FisError(f"unknown attribution method {method!r}", field="--method",
                           fix="use attribution or ig")
        check_steps(steps)
        self.precision = check_precision(precision, attached.split.device)
        self.contrast = choose_contrast(design, contrast)
        if design.readout.multi_token != "first_token":
            raise FisError("attribution reads first-token scores only", source=design.source,
                           field="readout.multi_token", fix="use multi_token: first_token, or --method activation")
        self.attached, self.points, self.method, self.steps = attached, list(points), method, steps
        self.tokenizer = attached.split.bridge.tokenizer
        self.readouts = Readouts.for_design(design, self.tokenizer)  # unknown target words fail here (exit 2)
        self.warnings = list(self.readouts.warnings) + precision_warnings(precision, attached.split.device)
        if method == "ig":
            self.warnings.append(
                "ig integrates the path that scales every feature of a point together (completeness over the "
                "point): each feature's share of ablating the whole point, not the effect of clamping it alone; "
                "on the demo checkpoint it ranked single-feature ablations worse than the first-order "
                "'attribution' estimate (docs/attribution.md)")
        self.closed = ClosedForm.of(attached.joint)
        self.low = LowPrecisionWeights(attached.split) if self.precision == "bfloat16" else None
        nfm = attached.joint.nfm
        if nfm is not None and nfm.top_m:
            self.warnings.append("the NFM keeps only its top_m latents: the SAE-point gradient ignores that "
                                 "selection")
        self.rows = rows.reset_index(drop=True)
        self.A: dict[str, np.ndarray] = {}
        self.B: dict[str, np.ndarray] = {}
        self.clean = np.full(len(self.rows), np.nan)
        self.done = np.zeros(len(self.rows), dtype=bool)
        self.pending: list[tuple[int, Any, Any]] = []  # (start, prepared batch, clean joint forward)
        self.pack = pack and method == "attribution"
        self.packed = False  # set when rows were packed: each row then carries its stimulus' mean

    def encode(self, start: int, stop: int) -> Any:
        """The battery's encoding of rows ``start:stop`` (tokens, readout positions, masks)."""
        from .interventions.battery import encode_rows

        return encode_rows(self.rows.iloc[start:stop], self.tokenizer)

    def batch(self, start: int, enc: Any, prefix: tuple[torch.Tensor, Any] | None = None, out: Any = None) -> None:
        """Estimates of rows ``start:start+len(enc.tokens)``: one suffix forward+backward (``attribution``; short
        batches are merged first, up to ``SUFFIX_TOKENS``: :meth:`flush`) or ``steps`` per point (``ig``).
        ``prefix``: ``(resid, state)`` of exactly these tokens, already computed; ``out``: the clean joint forward
        on the kept inputs, already computed."""
        from .interventions.battery import _prepare

        prep = _prepare(self.attached, enc, prefix)
        if out is None:
            out = joint_values(self.attached, prep.x)
        if self.method == "ig":
            n = len(prep.enc.tokens)
            row_of = torch.div(prep.keep_idx, prep.resid.shape[1], rounding_mode="floor")
            with self._suffix_weights():
                g, value = contrast_grad(self.attached, prep, self.readouts, self.contrast, precision=self.precision)
                terms = ig_path_terms(self.attached, prep, self.readouts, self.contrast, self.points, self.steps,
                                      row_of, n, out, self.precision, self.closed)
            self._store(slice(start, start + n), terms, value)
            return
        if self.pending and _padded_tokens([p for _, p, _ in self.pending] + [prep]) > SUFFIX_TOKENS:
            self.flush()
        self.pending.append((start, prep, out))
        if _padded_tokens([p for _, p, _ in self.pending]) >= SUFFIX_TOKENS:
            self.flush()

    def flush(self) -> None:
        """The pending batches' estimates, from ONE suffix forward+backward over them merged
        (:func:`merge_prepared`); then the closed form per batch on its share of the gradient."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        merged = merge_prepared(self.attached.split, [p for _, p, _ in pending], self.tokenizer.pad_token_id or 0)
        with self._suffix_weights():
            g, value = contrast_grad(self.attached, merged, self.readouts, self.contrast, precision=self.precision)
        g_parts = g.split([len(p.x) for _, p, _ in pending])
        v_parts = value.split([len(p.enc.tokens) for _, p, _ in pending])
        for (start, prep, out), g_part, v_part in zip(pending, g_parts, v_parts, strict=True):
            n = len(prep.enc.tokens)
            row_of = torch.div(prep.keep_idx, prep.resid.shape[1], rounding_mode="floor")
            self._store(slice(start, start + n),
                        point_terms(self.attached, g_part, out, self.points, row_of, n, self.closed), v_part)

    def _suffix_weights(self) -> Any:
        """The context the suffix runs in: bfloat16 weights swapped in (``--precision bfloat16``) or nothing."""
        return self.low if self.low is not None else nullcontext()

    def _store(self, rows: slice | list[int], terms: dict[str, PointTerms], value: torch.Tensor) -> None:
        """Write the estimates and clean contrasts of ``rows`` (in order) and mark them done."""
        for p, tm in terms.items():
            if p not in self.A:
                self.A[p] = np.empty((len(self.rows), tm.A.shape[1]), dtype=np.float64)
                self.B[p] = np.empty((len(self.rows), tm.A.shape[1]), dtype=np.float64)
            self.A[p][rows] = tm.A.double().cpu().numpy()
            self.B[p][rows] = tm.B.double().cpu().numpy()
        self.clean[rows] = value.double().cpu().numpy()
        self.done[rows] = True

    def run(self, batch_size: int = 16, progress: bool = False) -> None:
        """Every batch of rows not yet covered (by :meth:`batch` calls from a shared pass), ``batch_size`` rows
        at a time, each with its own prefix pass."""
        from tqdm.auto import tqdm

        self.flush()  # what a shared pass left pending
        if self.pack and self._run_packed(progress):
            return
        n = len(self.rows)
        todo = [s for s in range(0, n, batch_size) if not self.done[s:s + batch_size].all()]
        for start in tqdm(todo, disable=not progress or not todo, desc=f"screen {self.method}", unit="batch"):
            self.batch(start, self.encode(start, min(n, start + batch_size)))
        self.flush()

    def _run_packed(self, progress: bool) -> bool:
        """The rows not yet covered, each stimulus' rows (its prompts) packed into one sequence
        (:func:`pack_rows`): the shared stimulus is computed once instead of once per prompt. The gradient of the
        sum of a stimulus' contrasts gives the sum of its rows' estimates (the shared positions collect every row's
        gradient, each tail its own row's), so each row is given the stimulus' mean: what the screen uses. False
        (nothing done) where packing would not pay (one row per stimulus) or the model cannot pack."""
        from tqdm.auto import tqdm

        from .interventions.battery import encode_rows

        keys = list(zip(self.rows["item"].astype(str), self.rows["cell"].astype(str), strict=True))
        groups: dict[tuple[str, str], list[int]] = {}
        for i, k in enumerate(keys):
            if not self.done[i]:
                groups.setdefault(k, []).append(i)
        if not groups or max(len(g) for g in groups.values()) < 2:
            return False
        packs = []
        for idx in groups.values():
            enc = encode_rows(self.rows.iloc[idx], self.tokenizer)
            lengths = enc.mask.sum(1).tolist()
            seqs = [enc.tokens[i, :n].tolist() for i, n in enumerate(lengths)]
            packs.append(pack_rows(idx, seqs, enc.readout.tolist()))
        if not self.attached.split.can_pack(max(len(p.tokens) for p in packs)):
            return False
        batches: list[list[PackedRows]] = [[]]
        for p in packs:
            width = max([len(p.tokens)] + [len(q.tokens) for q in batches[-1]])
            if batches[-1] and (len(batches[-1]) + 1) * width > SUFFIX_TOKENS:
                batches.append([])
            batches[-1].append(p)
        for batch in tqdm(batches, disable=not progress, desc="screen attribution (packed)", unit="batch"):
            self._packed_batch(batch)
        self.packed = True
        return True

    def _packed_batch(self, packs: list[PackedRows]) -> None:
        from .interventions.battery import Encoded, Prepared, kept_inputs
        from .splice import Packing

        split = self.attached.split
        width, most = max(len(p.tokens) for p in packs), max(len(p.rows) for p in packs)
        pad = self.tokenizer.pad_token_id or 0

        def padded(values: list[int], fill: int, n: int) -> list[int]:
            return values + [fill] * (n - len(values))

        tokens = torch.tensor([padded(p.tokens, pad, width) for p in packs])
        mask = torch.tensor([padded([1] * len(p.tokens), 0, width) for p in packs])
        packing = Packing(torch.tensor([padded(p.positions, 0, width) for p in packs]),
                          torch.tensor([padded(p.segments, -1, width) for p in packs]))
        readout = torch.tensor([padded(p.readout, 0, most) for p in packs], device=split.device)
        valid = torch.tensor([padded([1] * len(p.rows), 0, most) for p in packs], device=split.device).bool()
        resid, state = split.prefix(tokens, mask, packing)
        tokens, mask = tokens.to(resid.device), mask.to(resid.device)
        keep_idx, x = kept_inputs(self.attached, tokens, mask, resid)
        prep = Prepared(Encoded(tokens, mask, readout[:, 0], torch.zeros_like(mask, dtype=torch.bool)), resid, state,
                        keep_idx, x, {})
        with self._suffix_weights():
            g, value = contrast_grad(self.attached, prep, self.readouts, self.contrast, precision=self.precision,
                                     positions=readout, valid=valid)
        out = joint_values(self.attached, x)
        row_of = torch.div(keep_idx, width, rounding_mode="floor")
        terms = point_terms(self.attached, g, out, self.points, row_of, len(packs), self.closed)
        # every row of a stimulus gets the stimulus' mean: its sum over the rows, over their count
        seq = torch.tensor([s for s, pk in enumerate(packs) for _ in pk.rows], device=g.device)
        count = torch.tensor([len(pk.rows) for pk in packs for _ in pk.rows], device=g.device, dtype=torch.float64)
        per_row = {p: PointTerms(tm.A.double()[seq] / count[:, None], tm.B.double()[seq] / count[:, None])
                   for p, tm in terms.items()}
        self._store([r for pk in packs for r in pk.rows], per_row, value[valid])

    def result(self) -> AttributionResult:
        self.flush()
        if not self.done.all():
            raise FisError(f"attribution covered {int(self.done.sum())} of {len(self.done)} rows (internal error)")
        return AttributionResult(self.rows, self.A, self.B, self.clean, self.contrast, self.method,
                                 self.steps if self.method == "ig" else None, self.warnings, self.precision,
                                 self.packed)


def attribute(attached: Any, design: Any, rows: pd.DataFrame, points: Sequence[str], contrast: str | None = None,
              method: str = "attribution", steps: int = 16, batch_size: int = 16, progress: bool = False,
              precision: str = "float32", pack: bool = False) -> AttributionResult:
    """Estimate, for every feature at ``points``, the contrast shift of clamping it, per stimulus row.

    ``rows``: the battery's expanded rows (stimulus x prompt, :func:`~fis_interventions.designs.expand`), e.g.
    the discovery items only. ``method``: ``attribution`` (one backward per batch) or ``ig`` (``steps``
    backward passes per point and batch; zero ablation path, see :func:`ig_path_terms`). ``precision``: of the
    suffix's forward and backward, ``float32`` or ``bfloat16`` (:func:`check_precision`). ``pack``: each
    stimulus' rows (its prompts) in one sequence, the shared stimulus computed once; every row then carries its
    stimulus' mean (``AttributionResult.packed``), which is all a screen needs, not its own estimate."""
    acc = Attributor(attached, design, rows, points, contrast, method, steps, precision, pack)
    acc.run(batch_size, progress)
    return acc.result()


@torch.no_grad()
def ig_path_terms(attached: Any, prep: Any, readouts: Any, contrast: str, points: Sequence[str], steps: int,
                  row_of: torch.Tensor, n_rows: int, clean: Any, precision: str = "float32",
                  closed: ClosedForm | None = None) -> dict[str, PointTerms]:
    """Integrated gradients of zero ablation for every feature of each point.

    Path: every feature of the point scaled by ``1 - alpha``, ``alpha`` at the ``steps`` midpoints of [0, 1].
    At each path point the suffix runs forward and backward (``g``) and the closed form gives ``G`` there
    (with the path point's own latents in the SAE's bi-interaction terms). ``B = sum_t mean_alpha(G) f_clean``
    (``A`` is the mean of ``sum_t G``), so ``estimate = c A - B`` keeps its meaning, and for zero ablation the
    per-feature estimates of one point add up to the path integral of the whole point's ablation."""
    b, t, d = prep.resid.shape
    result: dict[str, PointTerms] = {}
    for point in points:
        A = B = None
        for k in range(steps):
            alpha = (k + 0.5) / steps
            fn = _scale_edit(alpha)
            delta = attached.splice.stacked_deltas(prep.x, 1, {point: _on_copy_one(fn, len(prep.x))})[0]
            resid = prep.resid.reshape(b * t, d).index_add(0, prep.keep_idx, delta.to(prep.resid.dtype))
            g, _ = contrast_grad(attached, prep, readouts, contrast, resid.view(b, t, d), precision)
            at = joint_values(attached, prep.x, {point: fn})
            step = point_terms(attached, g, at, [point], row_of, n_rows, closed)[point]
            # point_terms weighted G with the path point's f = (1 - alpha) f_clean: undo that for B
            A = step.A if A is None else A + step.A
            stepB = step.B / (1.0 - alpha)
            B = stepB if B is None else B + stepB
        result[point] = PointTerms(A / steps, B / steps)
    return result
