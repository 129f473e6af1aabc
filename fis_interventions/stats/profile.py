"""Profiled (RE)ML deviance of a linear mixed model, in lme4's parameterisation, never forming a dense Z.

Hand-written (statsmodels' MixedLM has no crossed random slopes and builds dense per-group designs; no
Python package offers lme4's profiled deviance). The model is ``y = X b + Z Lambda u + e``, ``u ~ N(0, s2 I)``,
where each random factor ``g`` has ``k_g`` terms per level and a ``k_g x k_g`` lower-triangular relative
factor ``T_g`` (so the per-level covariance is ``s2 T_g T_g'``), exactly as ``lme4::lmer`` (Bates et al.
2015, eqs. 12-34):

* the first factor (items: many levels) is eliminated level by level: its blocks of
  ``A = Lambda' Z' Z Lambda + I`` are ``k x k`` and handled as one batched Cholesky;
* every other factor (crossed prompts: few levels) joins ``X`` and ``y`` as dense columns ``W``; after the
  item blocks are eliminated, one Cholesky of the ``(q_dense + p + 1)``-square Schur complement gives
  ``log|A|``, ``log|R_X|^2`` and the penalised residual sum of squares ``r^2``.

Only per-level cross-products (``Z_i'Z_i``, ``Z_i'W``) and ``W'W`` are stored, so memory grows with the
number of levels, not with rows x levels (80,000 rows x 20,000 items is a few MB).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.linalg import block_diag, cho_solve

# Variance components of (1|g) + (1|g:A) + (1|g:B) + (1|g:A:B) expressed as variances of the intercept and
# the +-0.5-coded slopes of (1 + a + b + ab || g): rows intercept, a, b, ab; columns the four components.
VARCOMP_MAP = {"1": {"1": 1.0, "xa": 0.5, "xb": 0.5, "xab": 0.25},
               "xa": {"xa": 2.0, "xab": 1.0}, "xb": {"xb": 2.0, "xab": 1.0}, "xab": {"xab": 4.0}}


@dataclass
class RandomFactor:
    """One grouping factor: level index per row, its random-term columns, and how ``T`` is parameterised.

    ``kind``: ``correlated`` (full lower triangle), ``diagonal`` (``||``) or ``varcomp`` (nested-factor
    variance components, only for the terms ``1, xa, xb, xab`` of a 2x2 with +-0.5 codes).
    """

    name: str
    codes: np.ndarray
    Z: np.ndarray
    terms: list[str]
    kind: str = "diagonal"
    n_levels: int = field(init=False)

    def __post_init__(self) -> None:
        self.codes = np.asarray(self.codes, dtype=np.int64)
        self.Z = np.asarray(self.Z, dtype=float).reshape(len(self.codes), -1)
        self.n_levels = int(self.codes.max()) + 1 if self.codes.size else 0
        if self.kind == "varcomp":
            self._vc = np.array([[VARCOMP_MAP[r].get(c, 0.0) for c in self.terms] for r in self.terms])

    @property
    def k(self) -> int:
        return self.Z.shape[1]

    @property
    def n_theta(self) -> int:
        return self.k * (self.k + 1) // 2 if self.kind == "correlated" else self.k

    def lower_bounds(self) -> list[float | None]:
        if self.kind != "correlated":
            return [0.0] * self.k
        rows, cols = np.tril_indices(self.k)
        return [0.0 if r == c else None for r, c in zip(rows, cols)]

    def start(self) -> np.ndarray:
        """lme4's start: identity relative factor."""
        if self.kind != "correlated":
            return np.ones(self.k)
        rows, cols = np.tril_indices(self.k)
        return (rows == cols).astype(float)

    def factor(self, theta: np.ndarray) -> np.ndarray:
        """``T`` with per-level covariance ``s2 T T'``."""
        if self.kind == "correlated":
            T = np.zeros((self.k, self.k))
            T[np.tril_indices(self.k)] = theta
            return T
        if self.kind == "varcomp":
            return np.diag(np.sqrt(self._vc @ (np.asarray(theta) ** 2)))
        return np.diag(theta)

    def diagonal_index(self) -> np.ndarray:
        """Positions in this factor's theta of the diagonal of ``T`` (lme4's singularity check uses these)."""
        if self.kind != "correlated":
            return np.arange(self.k)
        rows, cols = np.tril_indices(self.k)
        return np.flatnonzero(rows == cols)


def _group_sums(codes: np.ndarray, n_levels: int, values: np.ndarray, chunk: int = 20000) -> np.ndarray:
    """Sum the rows of ``values`` (``[n, ...]``) by level, in row chunks (bounded memory)."""
    n = len(codes)
    flat = values.reshape(n, -1)
    out = np.zeros((n_levels, flat.shape[1]))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        G = sp.csr_matrix((np.ones(stop - start), (codes[start:stop], np.arange(stop - start))),
                          shape=(n_levels, stop - start))
        out += G @ flat[start:stop]
    return out.reshape((n_levels,) + values.shape[1:])


def _batched_cholesky(A: np.ndarray) -> np.ndarray:
    """Lower Cholesky factors of many small SPD matrices ``[levels, k, k]``, vectorised over levels.

    Hand-written: LAPACK through ``np.linalg.cholesky`` pays a per-matrix overhead that dominates for
    20,000 blocks of size 4; here the loop runs over ``k`` (at most 4), each step over all levels at once.
    """
    k = A.shape[-1]
    L = np.zeros_like(A)
    for j in range(k):
        d = A[:, j, j] - np.einsum("li,li->l", L[:, j, :j], L[:, j, :j])
        if np.any(~(d > 0)):
            raise np.linalg.LinAlgError("matrix not positive definite")
        L[:, j, j] = np.sqrt(d)
        for i in range(j + 1, k):
            L[:, i, j] = (A[:, i, j] - np.einsum("li,li->l", L[:, i, :j], L[:, j, :j])) / L[:, j, j]
    return L


def _cho_solve(L: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``scipy.linalg.cho_solve`` with the lower factor ``L``, also for an empty system (a model whose dense part
    has no columns): scipy before 1.13 refuses 0 x 0 where later versions return the empty result."""
    if L.shape[0] == 0:
        return np.zeros(B.shape)
    return cho_solve((L, True), B)


def _batched_forward(L: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``L^-1 B`` for many small lower-triangular ``L`` (``[levels, k, k]``, ``B``: ``[levels, k, d]``)."""
    Y = np.empty_like(B)
    for j in range(L.shape[-1]):
        Y[:, j] = (B[:, j] - np.einsum("li,lid->ld", L[:, j, :j], Y[:, :j])) / L[:, j, j, None]
    return Y


class ProfiledDeviance:
    """lme4's profiled (RE)ML deviance and the fixed-effect covariance, as functions of ``theta``."""

    def __init__(self, y: np.ndarray, X: np.ndarray, factors: list[RandomFactor], reml: bool) -> None:
        if not factors:
            raise ValueError("a mixed model needs at least one random factor")
        self.y, self.X = np.asarray(y, float), np.asarray(X, float)
        self.n, self.p = self.X.shape
        self.reml = reml
        self.factors = factors
        self.first, self.dense = factors[0], factors[1:]
        dense_cols = [self._expand(f) for f in self.dense]
        self.q_dense = sum(c.shape[1] for c in dense_cols)
        n = self.n
        d = self.q_dense + self.p + 1
        self.d = d
        f0 = self.first
        self.ZtZ = _group_sums(f0.codes, f0.n_levels, f0.Z[:, :, None] * f0.Z[:, None, :])
        self.ZtW = np.zeros((f0.n_levels, f0.k, d))
        self.WtW = np.zeros((d, d))
        for start in range(0, n, 20000):
            sl = slice(start, min(start + 20000, n))
            W = np.hstack([c[sl].toarray() for c in dense_cols] + [self.X[sl], self.y[sl, None]])
            self.ZtW += _group_sums(f0.codes[sl], f0.n_levels, f0.Z[sl, :, None] * W[:, None, :])
            self.WtW += W.T @ W
        self.splits = np.cumsum([f.n_theta for f in factors])[:-1]

    def with_reml(self, reml: bool) -> "ProfiledDeviance":
        """The same data under the other criterion (REML <-> ML), sharing every cross-product."""
        other = copy.copy(self)
        other.reml = reml
        return other

    @staticmethod
    def _expand(f: RandomFactor) -> sp.csr_matrix:
        """Sparse ``[n, levels * k]`` random-effects columns of a dense (few-level) factor."""
        n, k = f.Z.shape
        rows = np.repeat(np.arange(n), k)
        cols = (f.codes[:, None] * k + np.arange(k)[None, :]).ravel()
        return sp.csr_matrix((f.Z.ravel(), (rows, cols)), shape=(n, f.n_levels * k))

    @property
    def n_theta(self) -> int:
        return sum(f.n_theta for f in self.factors)

    def bounds(self) -> list[tuple[float | None, None]]:
        return [(lb, None) for f in self.factors for lb in f.lower_bounds()]

    def start(self) -> np.ndarray:
        return np.concatenate([f.start() for f in self.factors])

    def split(self, theta: np.ndarray) -> list[np.ndarray]:
        return np.split(np.asarray(theta, float), self.splits)

    def _solve(self, theta: np.ndarray) -> dict[str, float | np.ndarray]:
        parts = self.split(theta)
        T0 = self.first.factor(parts[0])
        A = T0.T @ self.ZtZ @ T0 + np.eye(self.first.k)
        L = _batched_cholesky(A)
        U = T0.T @ self.ZtW
        V = _batched_forward(L, U)
        Vflat = V.reshape(-1, self.d)
        N = self.WtW - Vflat.T @ Vflat          # W'W - sum_l U_l' A_l^-1 U_l, before the dense factors' Lambda
        if self.dense:
            R = block_diag(*[np.kron(np.eye(f.n_levels), f.factor(t)) for f, t in zip(self.dense, parts[1:])],
                           np.eye(self.p + 1))
            if all(f.kind != "correlated" for f in self.dense):  # diagonal Lambda: a scaling, no matrix product
                r = np.diag(R)
                M = N * np.outer(r, r)
            else:
                M = R.T @ N @ R
        else:
            R = None
            M = N.copy()
        M[np.arange(self.q_dense), np.arange(self.q_dense)] += 1.0
        LM = np.linalg.cholesky(M)
        q, p = self.q_dense, self.p
        diag = np.diag(LM)
        logdet_a = 2.0 * np.sum(np.log(np.diagonal(L, axis1=1, axis2=2))) + 2.0 * np.sum(np.log(diag[:q]))
        logdet_rx = 2.0 * np.sum(np.log(diag[q:q + p]))
        return {"logdet_a": float(logdet_a), "logdet_rx": float(logdet_rx), "r2": float(diag[-1] ** 2),
                "LM": LM, "M": M, "L": L, "U": U, "V": V, "R": R, "T0": T0, "parts": parts, "N": N}

    def _logdet_grads(self, s: dict[str, float | np.ndarray], sizes: list[int]) -> list[np.ndarray]:
        """``d log|Omega_S| / d theta`` for the leading blocks ``S`` of the augmented system (analytic).

        ``Omega = Lambda' C Lambda + diag(I_q, 0)`` with ``C`` the cross-products of ``[Z, X, y]``; a leading
        block keeps the first-factor columns and the first ``size`` columns of ``W = [Z_dense, X, y]``
        (``q_dense``: the random part, ``q_dense + p``: REML's ``|A||R_X|^2``, ``d``: everything).
        ``d log|Omega_S| = 2 tr(Omega_S^-1 Lambda_S' C_SS dLambda_S)``; the first factor's diagonal blocks of
        ``Omega_S^-1`` come from the block elimination (``A_l^-1 (H_l + U_l P_S J_l)``), the dense part from
        ``M_S^-1 R_S' N_SS`` with ``N = W'W - sum_l U_l' A_l^-1 U_l``.
        """
        L, U, LM, T0, N = s["L"], s["U"], s["LM"], s["T0"], s["N"]
        k = self.first.k
        levels = U.shape[0]
        R = np.eye(self.d) if s["R"] is None else s["R"]
        eye = np.broadcast_to(np.eye(k), L.shape)
        Linv = _batched_forward(L, np.ascontiguousarray(eye))
        Ainv = np.einsum("lji,ljk->lik", Linv, Linv)
        H = T0.T @ self.ZtZ                                   # Lambda_l' Z_l'Z_l  [levels, k, k]
        B = Ainv @ U                                          # A_l^-1 U_l  [levels, k, d]
        Jt = np.swapaxes(H, 1, 2) @ B - self.ZtW              # J_l' (J_l = W_l'Z_l Lambda A_l^-1 H_l - W_l'Z_l)
        base = (Ainv @ H).sum(axis=0)
        out = []
        for size in sizes:
            Ls = LM[:size, :size]
            Rs = R[:size, :size]
            P = Rs @ _cho_solve(Ls, Rs.T)
            BP = (B[:, :, :size].reshape(levels * k, size) @ P).reshape(levels, k, size)  # one BLAS call
            # first-factor diagonal blocks of Omega_S^-1 Lambda' C, summed over levels:
            # sum_l A_l^-1 (H_l + U_l P J_l) = sum_l A_l^-1 H_l + sum_l B_l P J_l  (one tensordot)
            Gsum = base + np.tensordot(BP, Jt[:, :, :size], axes=([0, 2], [0, 2]))
            grad = [2.0 * self._factor_grad(self.first, s["parts"][0], Gsum)]
            if self.dense:
                GW = _cho_solve(Ls, Rs.T @ N[:size, :size])
                off = 0
                for f, t in zip(self.dense, s["parts"][1:]):
                    blocks = GW[off:off + f.n_levels * f.k, off:off + f.n_levels * f.k]
                    blocks = blocks.reshape(f.n_levels, f.k, f.n_levels, f.k)
                    grad.append(2.0 * self._factor_grad(f, t, np.einsum("mimj->ij", blocks)))
                    off += f.n_levels * f.k
            out.append(np.concatenate(grad))
        return out

    @staticmethod
    def _factor_grad(f: RandomFactor, theta: np.ndarray, Gsum: np.ndarray) -> np.ndarray:
        """``tr(Gsum dT/dtheta_j)`` for each of the factor's parameters."""
        if f.kind == "correlated":
            rows, cols = np.tril_indices(f.k)
            return Gsum[cols, rows]
        if f.kind == "varcomp":
            T = np.sqrt(f._vc @ (np.asarray(theta) ** 2))
            with np.errstate(divide="ignore", invalid="ignore"):
                dT = np.where(T[:, None] > 0, f._vc * np.asarray(theta)[None, :] / T[:, None], 0.0)
            return np.diag(Gsum) @ dT
        return np.diag(Gsum).copy()

    def deviance_and_gradient(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Profiled deviance and its analytic gradient in ``theta`` (inf and zeros where not PD)."""
        try:
            s = self._solve(theta)
        except np.linalg.LinAlgError:
            return np.inf, np.zeros(len(theta))
        if not s["r2"] > 0:
            return np.inf, np.zeros(len(theta))
        q, p = self.q_dense, self.p
        if self.reml:
            nu = self.n - p
            g1, g2 = self._logdet_grads(s, [q + p, self.d])
            f = s["logdet_a"] + s["logdet_rx"] + nu * (1.0 + np.log(2 * np.pi * s["r2"] / nu))
            return f, (1 - nu) * g1 + nu * g2
        g0, g1, g2 = self._logdet_grads(s, [q, q + p, self.d])
        f = s["logdet_a"] + self.n * (1.0 + np.log(2 * np.pi * s["r2"] / self.n))
        return f, g0 + self.n * (g2 - g1)

    def deviance_vp_gradient(self, varpar: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Analytic gradient of :meth:`deviance_vp` in ``(theta, sigma)`` and the fixed-effect covariance
        there (one solve for both: the Satterthwaite df differentiate them once more)."""
        theta, sigma = varpar[:-1], float(varpar[-1])
        s = self._solve(theta)
        q, p = self.q_dense, self.p
        nu = self.n - p if self.reml else self.n
        s2 = sigma * sigma
        if self.reml:
            g1, g2 = self._logdet_grads(s, [q + p, self.d])
            gt = g1 + s["r2"] / s2 * (g2 - g1)
        else:
            g0, g1, g2 = self._logdet_grads(s, [q, q + p, self.d])
            gt = g0 + s["r2"] / s2 * (g2 - g1)
        inv = np.linalg.inv(s["LM"][q:q + p, q:q + p])
        return np.append(gt, 2 * nu / sigma - 2 * s["r2"] / (s2 * sigma)), s2 * (inv.T @ inv)

    def deviance(self, theta: np.ndarray) -> float:
        """Profiled deviance (``-2 log L`` at the best ``b`` and ``s2`` for this ``theta``); inf if not PD."""
        try:
            s = self._solve(theta)
        except np.linalg.LinAlgError:
            return np.inf
        if not s["r2"] > 0:
            return np.inf
        if self.reml:
            nu = self.n - self.p
            return s["logdet_a"] + s["logdet_rx"] + nu * (1.0 + np.log(2 * np.pi * s["r2"] / nu))
        return s["logdet_a"] + self.n * (1.0 + np.log(2 * np.pi * s["r2"] / self.n))

    def deviance_vp(self, varpar: np.ndarray) -> float:
        """Deviance at ``(theta, sigma)`` without profiling ``sigma`` (lmerTest's ``devfun_vp``)."""
        theta, sigma = varpar[:-1], float(varpar[-1])
        s = self._solve(theta)
        s2 = sigma * sigma
        nu = self.n - self.p if self.reml else self.n
        extra = s["logdet_rx"] if self.reml else 0.0
        return s["logdet_a"] + extra + nu * np.log(2 * np.pi * s2) + s["r2"] / s2

    def sigma2(self, theta: np.ndarray) -> float:
        nu = self.n - self.p if self.reml else self.n
        return self._solve(theta)["r2"] / nu

    def beta(self, theta: np.ndarray) -> np.ndarray:
        s = self._solve(theta)
        LM, M = s["LM"], s["M"]
        sol = _cho_solve(LM[:-1, :-1], M[:-1, -1])
        return sol[self.q_dense:self.q_dense + self.p]

    def unscaled_cov(self, theta: np.ndarray) -> np.ndarray:
        """``(R_X' R_X)^-1``: the fixed-effect covariance divided by ``s2``."""
        LM = self._solve(theta)["LM"]
        q, p = self.q_dense, self.p
        Lx = LM[q:q + p, q:q + p]
        inv = np.linalg.inv(Lx)
        return inv.T @ inv

    def cov_beta_vp(self, varpar: np.ndarray) -> np.ndarray:
        return float(varpar[-1]) ** 2 * self.unscaled_cov(varpar[:-1])

    def random_cov(self, theta: np.ndarray, s2: float) -> list[np.ndarray]:
        """Per-level covariance matrix of each factor's random terms, ``s2 T T'``."""
        return [s2 * (T @ T.T) for T in (f.factor(t) for f, t in zip(self.factors, self.split(theta)))]
