"""Capturing a layer's inputs on the calibration set: the unfolded rows or their Gram matrices.

For layer ``l`` a method sees ``X`` ``[m, d]`` (the input computed by the float network) and
``X~`` ``[m, d]`` (computed by the partially quantised network, layers before ``l`` quantised),
where a row is one sample (Linear) or one im2col patch (Conv2d, the layer's real stride,
padding and dilation). ``CovStats`` keeps only their Gram matrices (memory independent of
``m``); ``Patches`` keeps the rows themselves.

Shape letters: ``N`` calibration images, ``m`` rows of the unfolded input, ``d`` fan-in
(``C_in * kh * kw`` for a convolution), ``R`` output rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CovStats",
    "LayerInputs",
    "Patches",
    "collect_inputs",
    "find_layers",
    "layer_inputs",
    "model_device",
    "unfold_input",
]

log = logging.getLogger(__name__)


@dataclass
class CovStats:
    """Gram matrices of a layer's inputs, accumulated in float64 over the calibration rows.

    ``H = X~^T X~``, ``G = X~^T X``, ``S = X^T X`` (all ``[d, d]``); ``sx``, ``sxt`` ``[d]`` are
    column sums of ``X`` and ``X~``; ``m`` the number of rows. Memory is independent of ``m``.
    """

    H: Tensor
    G: Tensor
    S: Tensor
    sx: Tensor
    sxt: Tensor
    m: int = 0

    @classmethod
    def zeros(cls, d: int, device: torch.device) -> CovStats:
        def z(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        return cls(z(d, d), z(d, d), z(d, d), z(d), z(d))

    def add(self, x: Tensor, xt: Tensor) -> None:
        """Accumulate rows ``x``, ``xt`` ``[m_b, d]`` (float64)."""
        h = xt.T @ xt
        self.H += h
        if x is xt or torch.equal(x, xt):  # e.g. the first layer: one Gram instead of three
            self.G += h
            self.S += h
        else:
            self.G += xt.T @ x
            self.S += x.T @ x
        self.sx += x.sum(0)
        self.sxt += xt.sum(0)
        self.m += len(x)

    def sq_errors(self, w: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
        """``(||Xw_r - X~q_r||^2, ||Xw_r||^2)`` per row of ``w``, ``q`` ``[R, d]``."""
        ref = ((w @ self.S) * w).sum(1)
        err = ref - 2 * ((q @ self.G) * w).sum(1) + ((q @ self.H) * q).sum(1)
        return err.clamp_min(0), ref


@dataclass
class Patches:
    """The unfolded layer inputs themselves: ``X``, ``X~`` ``[m, d]`` float64 (im2col form)."""

    X: Tensor
    Xt: Tensor

    @property
    def m(self) -> int:
        return len(self.X)

    @property
    def sx(self) -> Tensor:
        return self.X.sum(0)

    @property
    def sxt(self) -> Tensor:
        return self.Xt.sum(0)

    def sq_errors(self, w: Tensor, q: Tensor, chunk: int = 1 << 16) -> tuple[Tensor, Tensor]:
        """``(||Xw_r - X~q_r||^2, ||Xw_r||^2)`` per row of ``w``, ``q`` ``[R, d]``."""
        err = w.new_zeros(len(w))
        ref = w.new_zeros(len(w))
        for i in range(0, self.m, chunk):
            xw = self.X[i : i + chunk] @ w.T
            err += (xw - self.Xt[i : i + chunk] @ q.T).pow(2).sum(0)
            ref += xw.pow(2).sum(0)
        return err, ref


LayerInputs = CovStats | Patches


def unfold_input(layer: nn.Module, x: Tensor) -> Tensor:
    """Rows ``[m, d]`` of a layer input: im2col patches of a Conv2d, flattened rows of a Linear."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(
            x,
            layer.kernel_size,
            dilation=layer.dilation,
            padding=layer.padding,
            stride=layer.stride,
        )  # [B, d, L]
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


def _is_supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def find_layers(
    model: nn.Module, layers: Sequence[str] | None = None
) -> list[tuple[str, nn.Module]]:
    """The layers to quantise, in registration order.

    Without ``layers``: every Linear and (ungrouped, zero-padded) Conv2d; other leaf modules with
    a weight matrix are skipped with a warning. With ``layers`` (module names): exactly those,
    and a name that is missing or unsupported is a ``ValueError``.
    """
    named = dict(model.named_modules())
    if layers is not None:
        for name in layers:
            if name not in named:
                raise ValueError(f"layer {name!r} is not a module of the model")
            if not _is_supported(named[name]):
                raise ValueError(
                    f"layer {name!r} ({type(named[name]).__name__}) is not supported: only Linear "
                    "and ungrouped, zero-padded Conv2d layers can be quantised"
                )
        wanted = set(layers)
        return [(n, m) for n, m in named.items() if n in wanted]
    found = []
    for name, module in named.items():
        if _is_supported(module):
            found.append((name, module))
        elif next(module.children(), None) is None and _has_weight_matrix(module):
            log.warning(
                "skipping unsupported layer %r (%s): left in float", name, type(module).__name__
            )
    return found


def _has_weight_matrix(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, Tensor) and w.ndim >= 2


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _Stop(Exception):
    """Raised by a hook to end a forward pass at the layer being quantised."""


def layer_inputs(
    model: nn.Module, layer: nn.Module, X: Tensor, batch_size: int
) -> Iterator[Tensor]:
    """The inputs of ``layer`` inside ``model`` for ``X``, batch by batch (no rest-of-net compute)."""
    captured: list[Tensor] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        captured.append(args[0].detach())
        raise _Stop

    handle = layer.register_forward_pre_hook(hook)
    device = model_device(model)
    try:
        for i in range(0, len(X), batch_size):
            captured.clear()
            # no_grad only around the call: a grad-mode context held across ``yield`` would
            # leak into the caller (and be restored out of order when generators interleave).
            with torch.no_grad():
                try:
                    model(X[i : i + batch_size].to(device))
                except _Stop:
                    pass
            if not captured:
                raise RuntimeError("layer was not reached by the forward pass")
            yield captured[0]
    finally:
        handle.remove()


def collect_inputs(
    ref: nn.Module,
    ref_layer: nn.Module,
    qmodel: nn.Module,
    q_layer: nn.Module,
    X: Tensor,
    *,
    form: str,
    p: float,
    gen: torch.Generator,
    batch_size: int,
) -> LayerInputs:
    """``CovStats`` (form ``"covariance"``) or ``Patches`` (``"im2col"``) of one layer's inputs.

    ``p < 1`` keeps ``ceil(p * L)`` of each image's ``L`` conv patches, drawn without replacement,
    the same patches for ``X`` and ``X~``.
    """
    same = ref is qmodel
    stats: CovStats | None = None
    xs: list[Tensor] = []
    xts: list[Tensor] = []
    q_iter = layer_inputs(qmodel, q_layer, X, batch_size)
    r_iter = q_iter if same else layer_inputs(ref, ref_layer, X, batch_size)
    for xt_in in q_iter:
        x_in = xt_in if same else next(r_iter)
        xt = unfold_input(q_layer, xt_in).double()
        x = xt if same else unfold_input(q_layer, x_in).double()
        if isinstance(q_layer, nn.Conv2d) and p < 1:
            rows = _subsample_patches(len(xt_in), len(xt) // len(xt_in), p, gen, xt.device)
            xt, x = xt[rows], x[rows]
        if form == "covariance":
            if stats is None:
                stats = CovStats.zeros(xt.shape[1], xt.device)
            stats.add(x, xt)
        else:
            xs.append(x)
            xts.append(xt)
    if form == "covariance":
        assert stats is not None
        return stats
    X_all = torch.cat(xs)
    return Patches(X_all, X_all if same else torch.cat(xts))


def _subsample_patches(
    n: int, L: int, p: float, gen: torch.Generator, device: torch.device
) -> Tensor:
    k = max(1, math.ceil(p * L))
    idx = torch.rand(n, L, generator=gen).argsort(1)[:, :k]
    return (idx + L * torch.arange(n)[:, None]).reshape(-1).to(device)
