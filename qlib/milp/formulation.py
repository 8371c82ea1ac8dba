"""The worst case over every perturbed network as one mixed-integer linear program.

Perturbation model (``qlib.quant.Perturbation``, as in ``qlib.bounds``): inputs
``x̂ ∈ [x - eps_x, x + eps_x] ∩ [0, 1]``, every affine layer ``ẑ = (W + ΔW) h + (b + Δb)`` with
``|ΔW| <= eps_w``, ``|Δb| <= eps_b``, every hidden ReLU ``ĥ = relu(ẑ) + δ >= 0``, ``|δ| <= eps_a``.

Why a MILP is exact for MLPs. Every layer input ``h`` is non-negative (pixels in [0, 1],
activations >= 0). For a fixed ``h``, neuron ``i`` owns its weight row and bias, so over
``|ΔW_i| <= eps_w``, ``|Δb_i| <= eps_b`` the value ``ΔW_i h + Δb_i`` ranges over exactly
``[-(eps_w 1^T h + eps_b), eps_w 1^T h + eps_b]`` (the ends at ``ΔW_i = ±eps_w 1^T``, everything
between by scaling), independently of the other neurons. So the reachable ``ẑ`` given ``h`` is the
box ``|ẑ - W h - b| <= eps_w 1^T h + eps_b``: linear in ``(ẑ, h)`` because ``|h| = h``. The ReLU
``a = relu(ẑ)`` over known bounds ``l <= ẑ <= u`` is exactly encoded by one binary (big-M), and
``ĥ - a ∈ [-eps_a, eps_a]``, ``ĥ >= 0`` is linear. Projecting out the network parameters loses
nothing, so the MILP's optimum is the true worst case.

Per-layer boxes (``qlib.quant.LayerPerturbation``): every layer takes its own radii, and a clipped
ReLU ``ĥ = max(min(relu(ẑ), c) + δ, 0)`` is encoded exactly too: ``min(a, c) = a - relu(a - c)``
with a second binary where ``[max(l, 0), max(u, 0)]`` straddles ``c``; a clipped input is the box
``[max(min(x, c) - eps_x, 0), min(x, c) + eps_x]``. A uniform ``LayerPerturbation`` builds the
same program as its ``Perturbation``.

For ``Conv2d`` one kernel serves every position, but the box lets each position choose its own
``ΔW``: a relaxation, so the optimum is a sound bound, not the exact value (``Program.exact``).

Big-M constants come from the tightest sound bounds of ``qlib.bounds`` (``method="crown"`` by
default), widened by a tiny relative margin so float rounding never cuts off a reachable point;
neurons that are provably stable get no binary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from qlib import bounds
from qlib.bounds.perlayer import AnyPerturbation, clip_of, resolve
from qlib.quant import LayerPerturbation, Perturbation

__all__ = ["Program", "AffineVars", "ReluVars", "build", "WIDEN"]

# Pre-activation bounds are widened by WIDEN * (1 + |v|): far above float64 rounding of the bound
# computation (~1e-13 relative), far below anything that changes a big-M model's strength.
WIDEN = 1e-9


@dataclass(frozen=True)
class AffineVars:
    """Variables of affine layer ``net[index]``: its input ``h`` and output ``z`` (flat indices)."""

    index: int
    h: np.ndarray
    z: np.ndarray


@dataclass(frozen=True)
class ReluVars:
    """Variables of ReLU ``net[index]``: input ``z``, output ``h``; ``phase`` per neuron is +1
    (provably active), -1 (provably inactive) or 0 (unstable: ``binary`` holds its 0/1 variable,
    else -1); ``lower``/``upper`` are the (widened) pre-activation bounds used for big-M.
    ``clip`` is the ReLU's clip (None: none) and ``clip_binary`` per neuron the 0/1 variable of
    ``relu(a - clip)`` where the clip may or may not bind (else -1)."""

    index: int
    z: np.ndarray
    h: np.ndarray
    phase: np.ndarray
    binary: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    clip: float | None = None
    clip_binary: np.ndarray | None = None


@dataclass(frozen=True)
class Program:
    """``min c^T v`` s.t. ``row_lo <= A v <= row_hi``, ``col_lo <= v <= col_hi``, ``v_i`` integer
    where ``integer``; ``A`` is ``[rows, cols]`` CSR. The objective is chosen per solve.

    ``x0`` is the nominal input (flat), ``input`` its variables, ``logits`` the output variables;
    ``affine`` and ``relus`` list the per-layer variables for witnesses. ``exact`` is False when a
    Conv2d made the program a relaxation (its optimum is then a sound bound only).
    """

    A: sp.csr_matrix
    row_lo: np.ndarray
    row_hi: np.ndarray
    col_lo: np.ndarray
    col_hi: np.ndarray
    integer: np.ndarray
    x0: np.ndarray
    in_shape: tuple[int, ...]
    input: np.ndarray
    logits: np.ndarray
    affine: tuple[AffineVars, ...]
    relus: tuple[ReluVars, ...]
    pert: AnyPerturbation
    exact: bool
    method: str

    @property
    def n_vars(self) -> int:
        return self.A.shape[1]

    @property
    def n_rows(self) -> int:
        return self.A.shape[0]

    @property
    def n_binary(self) -> int:
        return int(self.integer.sum())

    @property
    def kind(self) -> str:
        """``"exact"`` or ``"sound bound (Conv2d relaxation)"``: how to read the optimum."""
        return "exact" if self.exact else "sound bound (Conv2d relaxation)"

    def objective(self, coefficients: dict[int, float]) -> np.ndarray:
        """A dense cost vector ``[cols]`` from ``{variable: coefficient}``."""
        c = np.zeros(self.n_vars)
        for j, v in coefficients.items():
            c[j] += v
        return c


class _Builder:
    """Columns and COO rows of a program under construction."""

    def __init__(self) -> None:
        self.lo: list[np.ndarray] = []
        self.hi: list[np.ndarray] = []
        self.int: list[np.ndarray] = []
        self.n = 0
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []
        self.rlo: list[np.ndarray] = []
        self.rhi: list[np.ndarray] = []
        self.m = 0

    def vars(self, lo: np.ndarray, hi: np.ndarray, integer: bool = False) -> np.ndarray:
        lo, hi = np.asarray(lo, float).ravel(), np.asarray(hi, float).ravel()
        idx = np.arange(self.n, self.n + lo.size)
        self.lo.append(lo)
        self.hi.append(hi)
        self.int.append(np.full(lo.size, integer))
        self.n += lo.size
        return idx

    def rows_from(
        self,
        local_rows: np.ndarray,
        cols: np.ndarray,
        vals: np.ndarray,
        lo: np.ndarray,
        hi: np.ndarray,
    ) -> None:
        """Add ``len(lo)`` rows; ``local_rows`` number them from 0."""
        self.rows.append(np.asarray(local_rows) + self.m)
        self.cols.append(np.asarray(cols))
        self.vals.append(np.asarray(vals, float))
        self.rlo.append(np.asarray(lo, float))
        self.rhi.append(np.asarray(hi, float))
        self.m += len(lo)

    def matrix(self) -> sp.csr_matrix:
        def cat(xs: list[np.ndarray]) -> np.ndarray:
            return np.concatenate(xs) if xs else np.zeros(0)

        return sp.csr_matrix(
            (cat(self.vals), (cat(self.rows).astype(int), cat(self.cols).astype(int))),
            shape=(self.m, self.n),
        )


def _dense(layer: bounds.Affine) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``(M, b, P)``: the layer as a matrix ``[out, in]``, its bias ``[out]``, and the 0/1
    receptive-field pattern ``P`` (None for Linear, where every row sees every input)."""
    W = layer.module.weight.detach().to(torch.float64)
    b = layer.bias_map(W).detach()
    if isinstance(layer, bounds.Linear):
        return W.numpy(), b.numpy(), None
    n_in = int(np.prod(layer.in_shape))
    with torch.no_grad():
        eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, *layer.in_shape)
        M = layer.apply(eye, W).reshape(n_in, -1).T
        P = (layer.apply(eye, torch.ones_like(W)).reshape(n_in, -1).T != 0).to(torch.float64)
        bias = b.expand(*layer.out_shape).reshape(-1)
    return M.numpy(), bias.numpy(), P.numpy()


def build(
    model: nn.Sequential, x: Tensor, pert: AnyPerturbation, method: bounds.Method = "crown"
) -> Program:
    """The program of one input ``x`` [*in_shape] (values in [0, 1]) under ``pert``, a uniform
    ``Perturbation`` or a per-layer ``LayerPerturbation``.

    Pre-activation bounds come from ``qlib.bounds.forward_bounds(..., method)``. Raises
    ``ValueError`` for an unsupported layer (naming it), an input outside [0, 1] or a
    ``LayerPerturbation`` whose lists do not match the network.
    """
    if not isinstance(pert, Perturbation | LayerPerturbation):
        raise TypeError(
            "pert must be a qlib.quant.Perturbation or LayerPerturbation, "
            f"got {type(pert).__name__}"
        )
    if method not in bounds.METHODS:
        raise ValueError(f"method must be one of {bounds.METHODS}, got {method!r}")
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ValueError(f"x must be one input [*in_shape], got {getattr(x, 'shape', x)}")
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise ValueError("x must be finite and in [0, 1] (a valid nominal input)")
    net = bounds.layers(model, tuple(x.shape))
    per = resolve(net, pert).layers
    X = x.detach().to(torch.float64).unsqueeze(0)
    with torch.no_grad():
        boxes = bounds.forward_bounds(net, X, pert, method)
    B = _Builder()
    box0 = boxes[0]
    h = B.vars(box0.lower.numpy(), box0.upper.numpy())
    inp = h
    affine: list[AffineVars] = []
    relus: list[ReluVars] = []
    exact = True
    for i, layer in enumerate(net):
        if isinstance(layer, bounds.Flatten):
            continue
        if isinstance(layer, bounds.Affine):
            out = boxes[i + 1]
            lo = out.lower.numpy().ravel()
            hi = out.upper.numpy().ravel()
            z = B.vars(lo - WIDEN * (1 + np.abs(lo)), hi + WIDEN * (1 + np.abs(hi)))
            M, b, P = _dense(layer)
            _affine_rows(B, M, b, P, h, z, per[i].eps_weight, per[i].eps_bias)
            exact &= P is None
            affine.append(AffineVars(i, h, z))
            h = z
        elif isinstance(layer, bounds.ReLU):
            h, rv = _relu(B, i, layer, h, per[i].eps_act, clip_of(per[i]))
            relus.append(rv)
        else:  # pragma: no cover - bounds.layers admits no other kind
            raise ValueError(f"layer {i} ({type(layer).__name__}): unsupported by the MILP")
    return Program(
        A=B.matrix(),
        row_lo=np.concatenate(B.rlo),
        row_hi=np.concatenate(B.rhi),
        col_lo=np.concatenate(B.lo),
        col_hi=np.concatenate(B.hi),
        integer=np.concatenate(B.int),
        x0=X.numpy().ravel().copy(),
        in_shape=tuple(x.shape),
        input=inp,
        logits=h,
        affine=tuple(affine),
        relus=tuple(relus),
        pert=pert,
        exact=bool(exact),
        method=method,
    )


def _affine_rows(
    B: _Builder,
    M: np.ndarray,
    b: np.ndarray,
    P: np.ndarray | None,
    h: np.ndarray,
    z: np.ndarray,
    eps_w: float,
    eps_b: float,
) -> None:
    """``|z - M h - b| <= eps_w (P h) + eps_b`` (``P h = 1^T h`` for Linear), ``h >= 0``."""
    n_out, n_in = M.shape
    rr, cc = np.nonzero(M)
    if eps_w == 0:
        # One ranged row per neuron: b - eps_b <= z - M h <= b + eps_b.
        rows = np.concatenate([np.arange(n_out), rr])
        cols = np.concatenate([z, h[cc]])
        vals = np.concatenate([np.ones(n_out), -M[rr, cc]])
        B.rows_from(rows, cols, vals, b - eps_b, b + eps_b)
        return
    if P is None:
        # Linear: s = 1^T h once, e_i = z_i - W_i h - b_i, then |e_i| <= eps_w s + eps_b. The
        # dense W appears once instead of twice.
        s = B.vars(np.zeros(1), np.full(1, np.inf))
        B.rows_from(
            np.zeros(n_in + 1, int),
            np.concatenate([s, h]),
            np.concatenate([[1.0], -np.ones(n_in)]),
            [0.0],
            [0.0],
        )
        e = B.vars(np.full(n_out, -np.inf), np.full(n_out, np.inf))
        rows = np.concatenate([np.arange(n_out), np.arange(n_out), rr])
        cols = np.concatenate([z, e, h[cc]])
        vals = np.concatenate([np.ones(n_out), -np.ones(n_out), -M[rr, cc]])
        B.rows_from(rows, cols, vals, b, b)
        ar = np.arange(n_out)
        # e_i - eps_w s <= eps_b and e_i + eps_w s >= -eps_b
        B.rows_from(
            np.concatenate([ar, ar]),
            np.concatenate([e, np.full(n_out, s[0])]),
            np.concatenate([np.ones(n_out), np.full(n_out, -eps_w)]),
            np.full(n_out, -np.inf),
            np.full(n_out, eps_b),
        )
        B.rows_from(
            np.concatenate([ar, ar]),
            np.concatenate([e, np.full(n_out, s[0])]),
            np.concatenate([np.ones(n_out), np.full(n_out, eps_w)]),
            np.full(n_out, -eps_b),
            np.full(n_out, np.inf),
        )
        return
    # Conv2d: every output position its own ΔW (the relaxation): z - (M ± eps_w P) h vs b ± eps_b.
    for sign in (1.0, -1.0):
        D = M + sign * eps_w * P
        r2, c2 = np.nonzero(D)
        rows = np.concatenate([np.arange(n_out), r2])
        cols = np.concatenate([z, h[c2]])
        vals = np.concatenate([np.ones(n_out), -D[r2, c2]])
        if sign > 0:
            B.rows_from(rows, cols, vals, np.full(n_out, -np.inf), b + eps_b)
        else:
            B.rows_from(rows, cols, vals, b - eps_b, np.full(n_out, np.inf))


def _relu(
    B: _Builder,
    index: int,
    layer: bounds.ReLU,
    z: np.ndarray,
    eps_a: float,
    clip: float | None = None,
) -> tuple[np.ndarray, ReluVars]:
    """``ĥ = relu(z) + δ`` (``min(relu(z), clip) + δ`` with a clip), ``|δ| <= eps_a``, ``ĥ >= 0``;
    big-M from ``layer.pre``."""
    if layer.pre is None:  # pragma: no cover - forward_bounds sets it
        raise RuntimeError(f"layer {index}: pre-activation bounds are not set")
    lo = layer.pre.lower.detach().numpy().ravel().astype(float)
    up = layer.pre.upper.detach().numpy().ravel().astype(float)
    lo = lo - WIDEN * (1 + np.abs(lo))
    up = up + WIDEN * (1 + np.abs(up))
    n = lo.size
    phase = np.where(lo >= 0, 1, np.where(up <= 0, -1, 0))
    act = np.nonzero(phase == 1)[0]
    uns = np.nonzero(phase == 0)[0]
    binary = np.full(n, -1)
    if clip is not None:
        return _clipped_relu(B, index, z, lo, up, phase, eps_a, clip)
    h = B.vars(np.maximum(lo - eps_a, 0.0), np.maximum(up, 0.0) + eps_a)
    # Active: -eps_a <= ĥ - z <= eps_a.
    if act.size:
        _within(B, h[act], z[act], eps_a)
    if uns.size:
        binary[uns] = d = B.vars(np.zeros(uns.size), np.ones(uns.size), integer=True)
        # Without activation noise ĥ is relu(z) itself.
        a = h[uns] if eps_a == 0 else B.vars(np.zeros(uns.size), up[uns])
        _exact_relu(B, a, z[uns], lo[uns], up[uns], d)
        if eps_a:
            _within(B, h[uns], a, eps_a)
    return h, ReluVars(index, z, h, phase, binary, lo, up)


def _within(B: _Builder, h: np.ndarray, a: np.ndarray, eps: float) -> None:
    """Rows ``-eps <= h_k - a_k <= eps``."""
    m = h.size
    k = np.arange(m)
    B.rows_from(
        np.concatenate([k, k]),
        np.concatenate([h, a]),
        np.concatenate([np.ones(m), -np.ones(m)]),
        np.full(m, -eps),
        np.full(m, eps),
    )


def _exact_relu(
    B: _Builder, a: np.ndarray, z: np.ndarray, low: np.ndarray, u: np.ndarray, d: np.ndarray
) -> None:
    """``a = relu(z)`` exactly for ``low < 0 < u`` (``a >= 0`` is ``a``'s column bound) with the
    binaries ``d``: ``a >= z``, ``a <= z - low (1 - d)``, ``a <= u d``."""
    m = a.size
    k = np.arange(m)
    B.rows_from(
        np.concatenate([k, k]),
        np.concatenate([a, z]),
        np.concatenate([np.ones(m), -np.ones(m)]),
        np.zeros(m),
        np.full(m, np.inf),
    )
    B.rows_from(
        np.concatenate([k, k, k]),
        np.concatenate([a, z, d]),
        np.concatenate([np.ones(m), -np.ones(m), -low]),
        np.full(m, -np.inf),
        -low,
    )
    B.rows_from(
        np.concatenate([k, k]),
        np.concatenate([a, d]),
        np.concatenate([np.ones(m), -u]),
        np.full(m, -np.inf),
        np.zeros(m),
    )


def _clipped_relu(
    B: _Builder,
    index: int,
    z: np.ndarray,
    lo: np.ndarray,
    up: np.ndarray,
    phase: np.ndarray,
    eps_a: float,
    clip: float,
) -> tuple[np.ndarray, ReluVars]:
    """``ĥ = max(min(relu(z), c) + δ, 0)``: ``a = relu(z)`` as above (``z`` itself where active),
    then ``g = min(a, c) = a - r`` with ``r = relu(a - c)`` exact by a second binary where
    ``[max(l, 0), max(u, 0)]`` straddles ``c`` (``g = a`` below it, ``g = c`` above), and
    ``-eps_a <= ĥ - g <= eps_a`` with ``ĥ >= 0`` as a column bound."""
    n = lo.size
    a_lo, a_hi = np.maximum(lo, 0.0), np.maximum(up, 0.0)
    g_lo, g_hi = np.minimum(a_lo, clip), np.minimum(a_hi, clip)
    h = B.vars(np.maximum(g_lo - eps_a, 0.0), g_hi + eps_a)
    binary = np.full(n, -1)
    clip_binary = np.full(n, -1)
    a = np.where(phase == 1, z, -1)  # the variable equal to relu(z); -1: the constant 0
    uns = np.nonzero(phase == 0)[0]
    if uns.size:
        binary[uns] = d = B.vars(np.zeros(uns.size), np.ones(uns.size), integer=True)
        a[uns] = B.vars(np.zeros(uns.size), a_hi[uns])
        _exact_relu(B, a[uns], z[uns], lo[uns], up[uns], d)
    # g = c (always clipped) and g = 0 (inactive) are constants: ĥ's column bounds say it all.
    free = np.nonzero((a >= 0) & (a_hi <= clip))[0]  # never clipped: g = a
    if free.size:
        _within(B, h[free], a[free], eps_a)
    cut = np.nonzero((a >= 0) & (a_lo < clip) & (a_hi > clip))[0]
    if cut.size:
        m = cut.size
        k = np.arange(m)
        L, U = a_lo[cut] - clip, a_hi[cut] - clip  # L < 0 < U: relu(a - c) is unstable
        r = B.vars(np.zeros(m), U)
        e = B.vars(np.zeros(m), np.ones(m), integer=True)
        clip_binary[cut] = e
        ac = a[cut]
        # r >= a - c, r <= a - c - L (1 - e), r <= U e
        B.rows_from(
            np.concatenate([k, k]),
            np.concatenate([r, ac]),
            np.concatenate([np.ones(m), -np.ones(m)]),
            np.full(m, -clip),
            np.full(m, np.inf),
        )
        B.rows_from(
            np.concatenate([k, k, k]),
            np.concatenate([r, ac, e]),
            np.concatenate([np.ones(m), -np.ones(m), -L]),
            np.full(m, -np.inf),
            -clip - L,
        )
        B.rows_from(
            np.concatenate([k, k]),
            np.concatenate([r, e]),
            np.concatenate([np.ones(m), -U]),
            np.full(m, -np.inf),
            np.zeros(m),
        )
        # -eps_a <= ĥ - a + r <= eps_a
        B.rows_from(
            np.concatenate([k, k, k]),
            np.concatenate([h[cut], ac, r]),
            np.concatenate([np.ones(m), -np.ones(m), np.ones(m)]),
            np.full(m, -eps_a),
            np.full(m, eps_a),
        )
    return h, ReluVars(index, z, h, phase, binary, lo, up, clip, clip_binary)
