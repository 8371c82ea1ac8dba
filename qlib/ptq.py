"""Post-training weight quantisation: the layer loop that RTN, GPFQ and GPTQ share.

Every method quantises the Linear and Conv2d layers of a model one after another, in module
registration order. For layer ``l`` it sees two inputs on the calibration set:

- ``X``  ``[m, d]``: the layer input computed by the float (analog) network,
- ``X~`` ``[m, d]``: the layer input computed by the partially quantised network
  (layers before ``l`` already quantised),

where a row is one sample (Linear) or one im2col patch (Conv2d, the layer's real stride,
padding and dilation), ``m`` the number of rows and ``d`` the fan-in. A per-layer ``solver``
turns the float weights ``W [R, d]`` into integer codes on a grid shared by all methods.

Shape letters: ``N`` calibration images, ``m`` rows of the unfolded input, ``d`` fan-in
(``C_in * kh * kw`` for a convolution), ``R`` output rows (neurons / channels, times the number
of scale candidates during the automatic scale search).

Grids (``levels``): ``"2^b"`` is the honest signed b-bit grid ``{-2^(b-1), ..., 2^(b-1)-1}``,
``"2^b-1"`` its symmetric narrow range, and ``"2^b+1"`` the published GPFQ alphabet
``{-2^(b-1), ..., 2^(b-1)}`` (one level more than b bits hold). The step is
``C * rad / max_int`` where ``rad`` is the mean over output rows of ``max|w|`` (per layer, as
published) or each row's ``max|w|`` (per channel). ``scalar="max"`` is the plain max-abs grid of
``qlib.quant.symmetric_quantizer``; ``scalar="auto"`` picks C from ``AUTO_SCALARS`` (plus the
max-abs value) minimising the layer's relative error ``||XW^T - X~Q^T||^2 / ||XW^T||^2``.

Dead columns: an input coordinate that is zero on every calibration row of ``X~`` carries no
information about its weight, so every method rounds that weight to nearest (RTN).
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlib.quant import UniformQuantizer

log = logging.getLogger(__name__)

LEVELS = ("2^b", "2^b-1", "2^b+1")
AUTO_SCALARS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6, 1.8, 2.0)
LOG_COLUMNS = (
    "time_utc",
    "model",
    "method",
    "bits",
    "levels",
    "per_channel",
    "scalar",
    "calib_size",
    "p",
    "seed",
    "accuracy",
    "float_accuracy",
    "time_s",
)

Calib = Tensor | tuple[Tensor, Tensor]
Bits = int | Sequence[int] | Mapping[str | int, int]


# ----------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class PublishedAlphabet(UniformQuantizer):
    """The published GPFQ alphabet ``scale * {-2^(b-1), ..., 2^(b-1)}``: 2^b + 1 levels.

    It needs ``b + 1`` bits to store; it is offered to reproduce the paper, not as a b-bit grid.
    """

    @property
    def min_int(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def max_int(self) -> int:
        return 2 ** (self.bits - 1)


def make_quantizer(bits: int, scale: float | Tensor, levels: str = "2^b") -> UniformQuantizer:
    """The shared grid: ``levels`` one of ``LEVELS``; ``scale`` a float or ``[R, 1]`` tensor."""
    _check_bits(bits, "bits")
    if levels == "2^b":
        return UniformQuantizer(bits, scale, signed=True, narrow_range=False)
    if levels == "2^b-1":
        return UniformQuantizer(bits, scale, signed=True, narrow_range=True)
    if levels == "2^b+1":
        return PublishedAlphabet(bits, scale)
    raise ValueError(f"levels must be one of {LEVELS}, got {levels!r}")


def round_codes(
    arg: Tensor, scale: Tensor, qz: UniformQuantizer, noise: Tensor | None = None
) -> Tensor:
    """Codes of ``arg [R]`` on steps ``scale [R]``: nearest, or stochastic with ``noise`` in [0, 1).

    Stochastic rounding (SPFQ) goes up with probability equal to the fractional part.
    """
    x = arg / scale
    x = torch.round(x) if noise is None else torch.floor(x + noise)
    return x.clamp_(qz.min_int, qz.max_int)


def check_scalar(scalar: object) -> None:
    ok = scalar in ("auto", "max") if isinstance(scalar, str) else (
        isinstance(scalar, int | float) and not isinstance(scalar, bool)
        and math.isfinite(scalar) and scalar > 0
    )
    if not ok:
        raise ValueError(f"scalar must be a positive float, 'auto' or 'max', got {scalar!r}")


def candidate_scalars(w: Tensor, scalar: float | str, per_channel: bool) -> list[float]:
    """The values of C to try for weights ``w [R, d]``."""
    check_scalar(scalar)
    if isinstance(scalar, str):
        rows = w.abs().amax(1)
        rad = rows.mean().item()
        # C that makes the top level the largest |w|: the max-abs grid (C = 1 per channel).
        c_max = 1.0 if per_channel or rad == 0 else rows.max().item() / rad
        return [c_max] if scalar == "max" else sorted({*AUTO_SCALARS, c_max})
    return [float(scalar)]


def grid_steps(w: Tensor, scalars: Sequence[float], max_int: int, per_channel: bool) -> Tensor:
    """Steps ``[K * R, 1]`` for weights ``w [R, d]``, one block of R rows per value of C."""
    rows = w.abs().amax(1)
    rad = rows if per_channel else rows.mean().expand_as(rows)
    rad = torch.where(rad > 0, rad, torch.ones_like(rad))  # an all-zero row keeps a valid grid
    c = torch.tensor(scalars, dtype=w.dtype, device=w.device)
    return (c[:, None] * rad[None, :] / max_int).reshape(-1, 1)


# ----------------------------------------------------------------------------- layer inputs


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


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class LayerResult:
    """One quantised layer: ``weight = codes * scale``; codes lie in ``[min_int, max_int]``.

    ``codes`` int32 with the weight's shape (``[out, in]`` or ``[out, C_in, kh, kw]``);
    ``scale`` float32, ``[]`` per layer or ``[out, 1, ...]`` per channel; ``scalar`` is the C
    used; ``rel_error`` is ``||XW^T - X~Q^T||^2 / ||XW^T||^2`` on the calibration set (nan
    without one); ``bias`` the layer's (possibly corrected) float bias.
    """

    name: str
    codes: Tensor
    scale: Tensor
    bits: int
    levels: str
    min_int: int
    max_int: int
    scalar: float
    rel_error: float
    bias: Tensor | None = None

    @property
    def num_levels(self) -> int:
        return self.max_int - self.min_int + 1

    def weight(self) -> Tensor:
        """The dequantised weight (float32, the layer's weight shape)."""
        return self.codes.float() * self.scale


@dataclass
class QuantizedModel:
    """A quantised copy of a model, its per-layer codes and scales, and the run's settings."""

    model: nn.Module
    layers: list[LayerResult]
    method: str
    config: dict
    calib_size: int
    time_s: float
    accuracy: float | None = None
    float_accuracy: float | None = None
    float_layers: list[str] = field(default_factory=list)

    def layer(self, name: str) -> LayerResult:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"no quantised layer named {name!r}; have {[r.name for r in self.layers]}")

    def export(self) -> dict[str, dict]:
        """Integer codes and scales per layer, ready for ``torch.save``."""
        return {
            r.name: {
                "codes": r.codes,
                "scale": r.scale,
                "bits": r.bits,
                "levels": r.levels,
                "min_int": r.min_int,
                "max_int": r.max_int,
                "bias": r.bias,
            }
            for r in self.layers
        }

    def log_row(self, model_name: str) -> dict:
        """One row of the run log (columns ``LOG_COLUMNS``)."""
        c = self.config
        return {
            "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": model_name,
            "method": self.method,
            "bits": "/".join(str(r.bits) for r in self.layers),
            "levels": c.get("levels"),
            "per_channel": c.get("per_channel"),
            "scalar": "/".join(f"{r.scalar:.4g}" for r in self.layers),
            "calib_size": self.calib_size,
            "p": c.get("p", 1.0),
            "seed": c.get("seed", 0),
            "accuracy": "" if self.accuracy is None else f"{self.accuracy:.6f}",
            "float_accuracy": "" if self.float_accuracy is None else f"{self.float_accuracy:.6f}",
            "time_s": f"{self.time_s:.3f}",
        }


def append_log(row: Mapping, path: str | os.PathLike) -> None:
    """Append ``row`` to the CSV at ``path``, writing the header when the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in LOG_COLUMNS})


def model_name(model: nn.Module) -> str:
    """A short name for logs: the architecture description if the model has one."""
    arch = getattr(model, "arch", None)
    if isinstance(arch, dict):
        parts = [arch.get("kind", "?")] + [
            f"{k}={v}" for k, v in arch.items() if k != "kind" and k != "in_shape"
        ]
        return " ".join(str(p) for p in parts)
    return type(model).__name__


# ----------------------------------------------------------------------------- arguments


@dataclass(frozen=True)
class Retrain:
    """Brief fine-tune of the float layers left after each quantised layer (published defaults)."""

    epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-6
    batch_size: int = 128


def _check_bits(bits: object, what: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"{what} must be an integer in [2, 16], got {bits!r}")


def resolve_bits(bits: Bits, layers: Sequence[tuple[str, nn.Module]]) -> list[int]:
    """Bit width per layer from an int, a per-layer list, or a mapping.

    Mapping keys: layer names, layer indices (into ``layers``), ``"conv"``/``"linear"``, or
    ``"default"``; the most specific key wins.
    """
    if isinstance(bits, Mapping):
        out = []
        for i, (name, module) in enumerate(layers):
            kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
            for key in (name, i, i - len(layers), kind, "default"):
                if key in bits:
                    out.append(bits[key])
                    break
            else:
                raise ValueError(f"bits: no entry for layer {name!r} (nor '{kind}' or 'default')")
    elif isinstance(bits, Sequence) and not isinstance(bits, str):
        if len(bits) != len(layers):
            raise ValueError(f"bits: got {len(bits)} values for {len(layers)} quantised layers")
        out = list(bits)
    else:
        out = [bits] * len(layers)
    for (name, _), b in zip(layers, out, strict=True):
        _check_bits(b, f"bits of layer {name!r}")
    return out


def split_float_layers(
    layers: list[tuple[str, nn.Module]], float_layers: Sequence[str | int]
) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """Remove the layers named (or indexed, negative allowed) in ``float_layers``."""
    names = [n for n, _ in layers]
    keep_float = set()
    for key in float_layers:
        if isinstance(key, int) and not isinstance(key, bool):
            if not -len(names) <= key < len(names):
                raise ValueError(f"float_layers: index {key} out of range for {len(names)} layers")
            keep_float.add(names[key])
        elif key in names:
            keep_float.add(key)
        else:
            raise ValueError(f"float_layers: {key!r} is not a quantisable layer; have {names}")
    return [(n, m) for n, m in layers if n not in keep_float], [n for n in names if n in keep_float]


def check_calib(model: nn.Module, calib: Calib | None) -> tuple[Tensor, Tensor | None]:
    """``(X [N, ...], y [N] or None)`` from a tensor or an ``(X, y)`` pair; ValueError if unusable."""
    if calib is None:
        raise ValueError("calibration set is required (got None)")
    y = None
    if isinstance(calib, tuple | list):
        if len(calib) != 2:
            raise ValueError("calibration set must be a tensor X or a pair (X, y)")
        X, y = calib
        if len(X) != len(y):
            raise ValueError(f"calibration set: X has {len(X)} samples but y has {len(y)}")
    else:
        X = calib
    if not isinstance(X, Tensor) or X.ndim < 2:
        raise ValueError("calibration set: X must be a tensor [N, ...]")
    if len(X) == 0:
        raise ValueError("calibration set is empty")
    arch = getattr(model, "arch", None)
    if (
        isinstance(arch, dict)
        and "in_shape" in arch
        and list(X.shape[1:]) != list(arch["in_shape"])
    ):
        raise ValueError(
            f"calibration set: samples have shape {list(X.shape[1:])}, model expects {arch['in_shape']}"
        )
    try:
        with torch.no_grad():
            model.eval()
            model(X[:1].to(_device(model)))
    except RuntimeError as e:
        raise ValueError(f"calibration set does not fit the model: {e}") from e
    return X, y


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ----------------------------------------------------------------------------- capture


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
    device = _device(model)
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


# ----------------------------------------------------------------------------- the loop

# solver(W [R, d] float64, grid with scale [R, 1], inputs, generator) -> codes [R, d]
Solver = Callable[[Tensor, UniformQuantizer, LayerInputs | None, torch.Generator], Tensor]


def quantize_layers(
    model: nn.Module,
    calib: Calib | None,
    bits: Bits,
    solver: Solver,
    *,
    method: str,
    scalar: float | str = "auto",
    levels: str = "2^b",
    per_channel: bool = False,
    form: str | None = "covariance",
    p: float = 1.0,
    fresh_batches: bool = False,
    bias_correction: bool = False,
    float_layers: Sequence[str | int] = (),
    layers: Sequence[str] | None = None,
    retrain: Retrain | None = None,
    seed: int = 0,
    batch_size: int = 256,
    eval_data: tuple[Tensor, Tensor] | None = None,
    log_path: str | os.PathLike | None = None,
    extra_config: Mapping | None = None,
) -> QuantizedModel:
    """Quantise ``model``'s layers one after another with ``solver``; the input model is untouched.

    ``form=None`` runs without calibration data (RTN without a calibration set). ``retrain`` uses
    the partially quantised, fine-tuned network itself as the reference (``X = X~``), as the
    published retraining code does, because its float layers no longer match the original.
    """
    start = time.perf_counter()
    if levels not in LEVELS:
        raise ValueError(f"levels must be one of {LEVELS}, got {levels!r}")
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p!r}")
    if form not in ("covariance", "im2col", None):
        raise ValueError(f"method must be 'covariance' or 'im2col', got {form!r}")
    qmodel = copy.deepcopy(model).eval()
    targets = find_layers(qmodel, layers)
    if not targets:
        raise ValueError("the model has no layer that can be quantised")
    targets, kept_float = split_float_layers(targets, float_layers)
    widths = resolve_bits(bits, targets)
    check_scalar(scalar)
    X, y = (None, None) if form is None else check_calib(qmodel, calib)
    if form is None and (scalar == "auto" or bias_correction or retrain is not None):
        raise ValueError("scalar='auto', bias_correction and retrain need a calibration set")
    if retrain is not None and y is None:
        raise ValueError("retrain needs a labelled calibration set (X, y)")
    ref = qmodel if retrain is not None else copy.deepcopy(model).eval()
    ref_modules = dict(ref.named_modules())
    gen = torch.Generator().manual_seed(seed)
    chunks = _calib_chunks(X, len(targets), fresh_batches, gen) if X is not None else None

    results = []
    for i, ((name, layer), b) in enumerate(zip(targets, widths, strict=True)):
        inputs = None
        if X is not None:
            Xi = X[chunks[i]] if chunks is not None else X
            inputs = collect_inputs(
                ref,
                ref_modules[name],
                qmodel,
                layer,
                Xi,
                form=form,
                p=p,
                gen=gen,
                batch_size=batch_size,
            )
        results.append(
            _quantize_one(
                name, layer, b, solver, inputs, scalar, levels, per_channel, bias_correction, gen
            )
        )
        if retrain is not None and i + 1 < len(targets):
            _fine_tune(qmodel, [m for _, m in targets[: i + 1]], X, y, retrain, seed + i)
    qmodel.eval()

    config = {
        "bits": widths,
        "scalar": scalar,
        "levels": levels,
        "per_channel": per_channel,
        "method": form,
        "p": p,
        "fresh_batches": fresh_batches,
        "bias_correction": bias_correction,
        "retrain": retrain,
        "seed": seed,
        **(extra_config or {}),
    }
    out = QuantizedModel(
        qmodel,
        results,
        method,
        config,
        calib_size=0 if X is None else len(X),
        time_s=time.perf_counter() - start,
        float_layers=kept_float,
    )
    if eval_data is not None:
        from qlib.models import evaluate

        out.accuracy = evaluate(qmodel, eval_data)
        out.float_accuracy = evaluate(copy.deepcopy(model), eval_data)
    if log_path is not None:
        append_log(out.log_row(model_name(model)), log_path)
    return out


def _calib_chunks(
    X: Tensor, n_layers: int, fresh: bool, gen: torch.Generator
) -> list[Tensor] | None:
    """Disjoint, seeded index sets, one per layer (published fresh batches); None = reuse all."""
    if not fresh:
        return None
    if len(X) < n_layers:
        raise ValueError(
            f"calibration set: fresh_batches needs at least one image per layer ({n_layers}), got {len(X)}"
        )
    return list(torch.randperm(len(X), generator=gen).tensor_split(n_layers))


def _quantize_one(
    name: str,
    layer: nn.Module,
    bits: int,
    solver: Solver,
    inputs: LayerInputs | None,
    scalar: float | str,
    levels: str,
    per_channel: bool,
    bias_correction: bool,
    gen: torch.Generator,
) -> LayerResult:
    """Quantise one layer in place (its weight becomes ``codes * scale``) and describe it."""
    w = layer.weight.detach().reshape(len(layer.weight), -1).double()  # [R, d]
    R = len(w)
    max_int = make_quantizer(bits, 1.0, levels).max_int
    scalars = candidate_scalars(w, scalar, per_channel)
    steps = grid_steps(w, scalars, max_int, per_channel)  # [K * R, 1]
    qz = make_quantizer(bits, steps, levels)
    w_all = w.repeat(len(scalars), 1)  # the K candidate grids solved as one stack of rows
    codes = solver(w_all, qz, inputs, gen)  # [K * R, d]
    if inputs is not None:
        err, ref = inputs.sq_errors(w_all, codes * steps)
        rel = err.reshape(-1, R).sum(1) / ref[:R].sum().clamp_min(1e-300)
        best = int(torch.argmin(rel))  # first minimum: ties keep the smaller C
        rel_error = rel[best].item()
    else:
        best, rel_error = 0, float("nan")
    codes, step = codes[best * R : (best + 1) * R], steps[best * R : (best + 1) * R]
    q = codes * step
    with torch.no_grad():
        layer.weight.copy_(q.reshape(layer.weight.shape).to(layer.weight.dtype))
        if bias_correction:
            assert inputs is not None
            # E[Xw - X~q] over calibration rows, added back so the mean output is unchanged.
            shift = (w @ inputs.sx - q @ inputs.sxt) / inputs.m
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(R, dtype=layer.weight.dtype, device=w.device))
            layer.bias += shift.to(layer.bias.dtype)
    scale = step.reshape(-1, *([1] * (layer.weight.ndim - 1))) if per_channel else step[0, 0]
    return LayerResult(
        name=name,
        codes=codes.reshape(layer.weight.shape).to(torch.int32).cpu(),
        scale=scale.float().cpu(),
        bits=bits,
        levels=levels,
        min_int=qz.min_int,
        max_int=qz.max_int,
        scalar=scalars[best],
        rel_error=rel_error,
        bias=None if layer.bias is None else layer.bias.detach().clone().cpu(),
    )


def _fine_tune(
    model: nn.Module, frozen: list[nn.Module], X: Tensor, y: Tensor, cfg: Retrain, seed: int
) -> None:
    """Train the parameters of ``model`` outside ``frozen`` layers on ``(X, y)`` for a short while."""
    frozen_ids = {id(p) for m in frozen for p in m.parameters()}
    params = [p for p in model.parameters() if id(p) not in frozen_ids]
    if not params:
        return
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    device = _device(model)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = F.cross_entropy(model(X[idx].to(device)), y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in model.parameters():
                if id(p) in frozen_ids:
                    p.grad = None  # frozen: Adam skips parameters without a gradient
            opt.step()
    model.eval()


# ----------------------------------------------------------------------------- RTN


def rtn_solver(
    w: Tensor, qz: UniformQuantizer, inputs: LayerInputs | None, gen: torch.Generator
) -> Tensor:
    """Round to nearest: codes ``[R, d]`` of ``w [R, d]``."""
    return qz.to_int(w)


def rtn(
    model: nn.Module,
    bits: Bits,
    *,
    calib: Calib | None = None,
    scalar: float | str = "max",
    levels: str = "2^b",
    per_channel: bool = False,
    float_layers: Sequence[str | int] = (),
    layers: Sequence[str] | None = None,
    batch_size: int = 256,
    eval_data: tuple[Tensor, Tensor] | None = None,
    log_path: str | os.PathLike | None = None,
) -> QuantizedModel:
    """Round-to-nearest on the shared grid. With ``calib`` the layer errors are measured (on the
    partially RTN-quantised network) and ``scalar="auto"`` becomes available."""
    return quantize_layers(
        model,
        calib,
        bits,
        rtn_solver,
        method="rtn",
        scalar=scalar,
        levels=levels,
        per_channel=per_channel,
        form=None if calib is None else "covariance",
        float_layers=float_layers,
        layers=layers,
        batch_size=batch_size,
        eval_data=eval_data,
        log_path=log_path,
    )


# ----------------------------------------------------------------------------- experiment helpers


def calibration_indices(n: int, size: int, *, seed: int = 0) -> Tensor:
    """A fixed, seeded draw of ``size`` distinct indices out of ``range(n)`` (a calibration set)."""
    if not 1 <= size <= n:
        raise ValueError(f"calibration size must be in [1, {n}] (the data size), got {size}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


def single_layer_errors(W: Tensor, X: Tensor, bits: int, *, scalar: float | str = "auto") -> dict[str, float]:
    """Relative errors ``||Xw - Xq||^2 / ||Xw||^2`` of RTN, GPFQ and GPTQ on one linear layer.

    ``W`` [R, d] the weights, ``X`` [m, d] the layer inputs (nothing before the layer is
    quantised, so ``X~ = X``); every method uses the same grid search for the scale.
    """
    from qlib import gpfq, gptq, models

    R, d = W.shape
    if X.ndim != 2 or X.shape[1] != d:
        raise ValueError(f"X must be [m, {d}] to match W [{R}, {d}], got {list(X.shape)}")
    net = models.mlp([1, 1, d], [], R)
    with torch.no_grad():
        net[1].weight.copy_(W)
        net[1].bias.zero_()
    calib = X.float().reshape(-1, 1, 1, d)
    runs = {
        "RTN": lambda: rtn(net, bits, calib=calib, scalar=scalar),
        "GPFQ": lambda: gpfq.quantize(net, calib, bits, scalar=scalar),
        "GPTQ": lambda: gptq.quantize(net, calib, bits, scalar=scalar),
    }
    return {name: run().layers[0].rel_error for name, run in runs.items()}
