"""Training configuration (YAML via :func:`fis_interventions.config.load_config`): plain data, checked early."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, PositiveInt, model_validator

from ..config import Seed, StrictModel
from .model import JointArch, NFMArch, SAEArch


class SecondaryConfig(StrictModel):
    """TopK SAE on the NFM hidden layer, trained after the main model (its latents get clamped)."""

    d_sae: PositiveInt
    k: PositiveInt
    steps: PositiveInt = 1000


class TrainConfig(StrictModel):
    """What to train, on what, for how long. Learning-rate defaults follow the paper (Adam 1e-4, decay to 0.1x,
    clip 1.0); ``tokens`` is the budget per training phase (sequential without a checkpoint has two phases)."""

    # data: a shard folder, or a model/hook/corpus for on-the-fly harvest (wired by the activations module)
    activations: Path | None = None
    model: str | None = None
    hook: str | None = None
    corpus: str | None = None
    # SAE
    d_sae: PositiveInt | None = None
    expansion: PositiveInt | None = None
    k: PositiveInt = 32
    aux_k: PositiveInt | None = None
    dead_tokens: PositiveInt = 10_000_000
    normalize_decoder: bool = True
    # integration module
    emb_dim: PositiveInt = 64
    hidden: PositiveInt = 64
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    top_m: PositiveInt | None = None
    linear_bias: bool = True
    mode: Literal["sae", "sequential", "joint"] = "joint"
    sae_checkpoint: Path | None = None
    secondary: SecondaryConfig | None = None
    # optimisation
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    lr_decay_to: float = Field(0.1, ge=0.0, le=1.0)
    grad_clip: float | None = Field(1.0, gt=0)
    batch_size: PositiveInt = 1024
    tokens: PositiveInt = 10_000_000
    seed: Seed = 0
    eval_every: PositiveInt = 500
    checkpoint_every: PositiveInt = 1000
    heldout_fraction: float = Field(0.01, ge=0.0, lt=0.5)
    device: str = Field("auto", description="auto (the GPU when there is one), cpu, cuda, cuda:N or mps "
                                            "(cuda:LOCAL_RANK under torchrun); as every other stage")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="matmul precision: bfloat16 = autocast, weights and Adam stay float32; "
                               "float16 is refused")

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.d_sae is not None and self.expansion is not None:
            raise ValueError("give exactly one of d_sae and expansion")
        if self.d_sae is None and self.expansion is None and self.sae_checkpoint is None:
            raise ValueError("give exactly one of d_sae and expansion (with sae_checkpoint: neither, they are read "
                             "from the SAE)")
        if self.activations is not None and self.model is not None:
            raise ValueError("give either activations (a shard folder) or model/hook/corpus, not both")
        if self.model is not None and (self.hook is None or self.corpus is None):
            raise ValueError("on-the-fly harvest needs model, hook and corpus")
        if self.sae_checkpoint is not None and self.mode != "sequential":
            raise ValueError("sae_checkpoint is only used with mode: sequential")
        if self.dtype == "float16":
            raise ValueError("float16 training is refused (its range needs a loss scaler); use dtype: bfloat16 "
                             "(autocast with float32 master weights) or float32")
        if self.secondary is not None and self.mode == "sae":
            raise ValueError("a secondary SAE needs the integration module (mode sequential or joint)")
        return self

    def steps(self) -> int:
        """Optimiser steps per training phase."""
        return max(1, self.tokens // self.batch_size)

    def arch(self, d_in: int) -> JointArch:
        """Model shapes once the input width is known."""
        d_sae = self.d_sae or d_in * (self.expansion or 1)
        sae = SAEArch(d_in=d_in, d_sae=d_sae, k=self.k, aux_k=self.aux_k,
                      normalize_decoder=self.normalize_decoder)
        nfm = None
        if self.mode != "sae":
            nfm = NFMArch(emb_dim=self.emb_dim, hidden=self.hidden, dropout=self.dropout,
                          linear_bias=self.linear_bias, top_m=self.top_m)
        return JointArch(sae=sae, nfm=nfm)
