"""Evaluating fixed-point networks: accuracy, the published quantisation error, saturation and
the certified bound of each quantised network, over a sweep of bit widths."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from qlib.fixedpoint.simulator import (
    DTYPE,
    FixedPoint,
    LayerQuant,
    QuantizedInputs,
    check_bits,
    fixed_point,
    layer_bias,
    mlp_linears,
    quantize_inputs,
)
from qlib.quant import LayerPerturbation

__all__ = ["PTQResult", "evaluate_fixed_point", "ptq_sweep"]


@dataclass(frozen=True)
class PTQResult:
    """One quantised network evaluated on a test set of ``N`` images.

    ``error`` [N]: ``|p_y(quantised) - p_y(float)|``, the change in true-class probability; its
    max and mean are the published quantisation errors. ``linf_*``: the max over classes of the
    probability change (what the published F-MNIST script computes). ``certified`` [n]: the
    certified worst-case discrepancy (``qlib.bounds.worst_case_discrepancy``) of the first
    ``n`` images under ``pert``, a per-layer box that contains this quantised network
    (``widened``: the parameter kinds whose radius saturation pushed past half a step).
    ``correct`` [N]: whether the
    quantised network classifies each image correctly (for paired comparisons).
    """

    model: str
    config: FixedPoint
    accuracy: float
    float_accuracy: float
    error: Tensor
    error_max: float
    error_mean: float
    linf_max: float
    linf_mean: float
    saturated_weights: int
    saturated_biases: int
    saturated_inputs: int
    saturated_acts: int
    n_weights: int
    layers: tuple[LayerQuant, ...]
    pert: LayerPerturbation
    widened: tuple[str, ...]
    certified: Tensor | None = None
    method: str | None = None
    correct: Tensor | None = None

    @property
    def certified_max(self) -> float | None:
        return None if self.certified is None else self.certified.max().item()

    @property
    def certified_mean(self) -> float | None:
        return None if self.certified is None else self.certified.mean().item()

    def row(self) -> dict:
        """A flat dict for a table."""
        n = 0 if self.certified is None else len(self.certified)
        return {
            "model": self.model,
            "weight_bits": self.config.weight_bits,
            "input_bits": self.config.input_bits,
            "act_bits": self.config.act_bits,
            "asymmetric": self.config.asymmetric,
            "accuracy": self.accuracy,
            "float_accuracy": self.float_accuracy,
            "error_max": self.error_max,
            "error_mean": self.error_mean,
            "linf_max": self.linf_max,
            "linf_mean": self.linf_mean,
            "saturated_weights": self.saturated_weights,
            "saturated_inputs": self.saturated_inputs,
            "saturated_acts": self.saturated_acts,
            "widened": ",".join(self.widened),
            "n_certified": n,
            "measured_max_on_certified": self.error[:n].max().item() if n else None,
            "certified_max": self.certified_max,
            "certified_mean": self.certified_mean,
        }


@torch.no_grad()
def _float_reference(model: nn.Module, X: Tensor) -> Tensor:
    """Float64 logits of the float network ``[N, classes]``."""
    linears = mlp_linears(model)
    h = X.flatten(1).to(DTYPE)
    for i, lin in enumerate(linears):
        h = F.linear(h, lin.weight.to(DTYPE), layer_bias(lin))
        if i < len(linears) - 1:
            h = torch.relu(h)
    return h


def _check_xy(X: Tensor, y: Tensor) -> None:
    if not isinstance(X, Tensor) or X.ndim < 2 or len(X) == 0:
        raise ValueError(f"X must be a non-empty batch [N, ...], got {getattr(X, 'shape', X)}")
    if not isinstance(y, Tensor) or y.shape != (len(X),):
        raise ValueError(f"y must have shape ({len(X)},), got {getattr(y, 'shape', y)}")
    if not torch.isfinite(X).all() or X.min() < 0 or X.max() > 1:
        raise ValueError("X must be finite and in [0, 1]")


def evaluate_fixed_point(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    config: FixedPoint | None = None,
    *,
    calib: Tensor | None = None,
    certify: int = 0,
    method: str = "ibp",
    name: str = "model",
    reference: Tensor | None = None,
    inputs: QuantizedInputs | None = None,
) -> PTQResult:
    """Quantise ``model`` with ``config``, run it on ``X`` [N, C, H, W] with labels ``y`` [N],
    and report accuracy, quantisation error and saturation; with ``certify = n > 0`` also the
    certified worst-case discrepancy of the first ``n`` images (``method`` bounds of
    ``qlib.bounds``). ``reference`` (float logits of ``model`` on ``X``) and ``inputs``
    (``quantize_inputs(X, config.input_bits)``) may be passed to share them across networks."""
    from qlib import bounds

    _check_xy(X, y)
    if isinstance(certify, bool) or not isinstance(certify, int) or certify < 0:
        raise ValueError(f"certify must be an integer >= 0, got {certify!r}")
    q = fixed_point(model, config, calib)
    sim = q.forward(X, inputs)
    ref = _float_reference(model, X) if reference is None else reference
    y = y.long()
    p_q, p_f = torch.softmax(sim.logits, 1), torch.softmax(ref, 1)
    error = (p_q - p_f).gather(1, y[:, None]).squeeze(1).abs()
    linf = (p_q - p_f).abs().amax(1)
    pert, widened = q.perturbation()
    certified = None
    if certify:
        n = min(certify, len(X))
        certified = bounds.worst_case_discrepancy(model, X[:n], y[:n], pert, method).d
    return PTQResult(
        model=name,
        config=q.config,
        accuracy=(sim.logits.argmax(1) == y).double().mean().item(),
        float_accuracy=(ref.argmax(1) == y).double().mean().item(),
        error=error,
        error_max=error.max().item(),
        error_mean=error.mean().item(),
        linf_max=linf.max().item(),
        linf_mean=linf.mean().item(),
        saturated_weights=q.saturated_weights,
        saturated_biases=q.saturated_biases,
        saturated_inputs=sim.saturated_inputs,
        saturated_acts=sim.saturated_acts,
        n_weights=sum(layer.n_weights for layer in q.layers),
        layers=tuple(q.layers),
        pert=pert,
        widened=widened,
        certified=certified,
        method=method if certify else None,
        correct=sim.logits.argmax(1) == y,
    )


def ptq_sweep(
    models: Mapping[str, nn.Module],
    X: Tensor,
    y: Tensor,
    weight_bits: Iterable[int] = range(2, 17),
    config: FixedPoint | None = None,
    *,
    calib: Tensor | None = None,
    certify: int = 0,
    method: str = "ibp",
    progress: bool = True,
) -> list[PTQResult]:
    """``evaluate_fixed_point`` for every model and weight (and bias) bit width; the other
    settings come from ``config``. The float reference runs once per model."""
    base = config or FixedPoint()
    bits = [check_bits("weight_bits", b) for b in weight_bits]
    if not models:
        raise ValueError("models is empty: give a mapping name -> model")
    jobs = [(name, b) for name in models for b in bits]
    refs = {name: _float_reference(m, X) for name, m in models.items()}
    inputs = quantize_inputs(X, base.input_bits)
    out = []
    for name, b in tqdm(jobs, desc="PTQ sweep", disable=not progress, leave=False):
        cfg = replace(base, weight_bits=b, bias_bits=None)
        out.append(
            evaluate_fixed_point(
                models[name],
                X,
                y,
                cfg,
                calib=calib,
                certify=certify,
                method=method,
                name=name,
                reference=refs[name],
                inputs=inputs,
            )
        )
    return out
