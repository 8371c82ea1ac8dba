"""Certified robust training against quantisation perturbations (IBP or CROWN-IBP bounds).

The loss is ``kappa * CE(f(x), y) + (1 - kappa) * CE(z̃, y)`` with the worst-case logits
``z̃_y = L_y`` and ``z̃_j = U_j`` (Gowal et al.'s IBP training, as in the certification paper).
Schedules run per batch: ``kappa = 1`` and ``eps = 0`` during ``warmup`` epochs, then ``kappa`` is
constant and the perturbation is scaled linearly from 0 to 1 over ``ramp`` epochs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlib import bounds, models
from qlib.quant import Perturbation

__all__ = [
    "RobustTrainLog",
    "robust_loss",
    "schedule",
    "train",
]


Data = tuple[Tensor, Tensor]


@dataclass
class RobustTrainLog:
    """Per-epoch training loss and, with a validation split, verified and clean accuracy."""

    loss: list[float] = field(default_factory=list)
    val_verified: list[float] = field(default_factory=list)
    val_clean: list[float] = field(default_factory=list)
    best_epoch: int | None = None


def schedule(step: int, warmup_steps: int, ramp_steps: int, kappa: float) -> tuple[float, float]:
    """``(kappa_t, eps_scale_t)`` at optimiser step ``step``."""
    if step < warmup_steps:
        return 1.0, 0.0
    scale = 1.0 if ramp_steps == 0 else min(1.0, (step - warmup_steps + 1) / ramp_steps)
    return kappa, scale


def robust_loss(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    pert: Perturbation,
    kappa: float,
    method: Literal["ibp", "crown-ibp"] = "ibp",
) -> Tensor:
    """The mixed clean / worst-case cross-entropy for a batch ``X`` [B, ...], ``y`` [B]."""
    clean = F.cross_entropy(model(X), y)
    if kappa >= 1.0:
        return clean
    lower, upper = bounds.logit_bounds(model, X, pert, method, dtype=X.dtype, differentiable=True)
    worst = torch.where(F.one_hot(y, lower.shape[1]).bool(), lower, upper)
    return kappa * clean + (1.0 - kappa) * F.cross_entropy(worst, y)


def train(
    model: nn.Module,
    data: Data,
    pert: Perturbation,
    *,
    method: Literal["ibp", "crown-ibp"] = "ibp",
    epochs: int = 20,
    kappa: float = 0.5,
    warmup: int = 2,
    ramp: int = 10,
    lr: float = 1e-3,
    batch_size: int = 128,
    val: Data | None = None,
    seed: int = 0,
    progress: bool = True,
) -> RobustTrainLog:
    """Train ``model`` in place with Adam on ``data`` = (X [N, C, H, W] in [0, 1], y [N]).

    ``warmup`` and ``ramp`` are in epochs (see the module docstring). With ``val`` the weights of
    the epoch with the best verified accuracy (``method`` bounds at the full ``pert``, margin
    spec) are kept, ties broken by clean accuracy; the test set is never used.
    """
    if method not in ("ibp", "crown-ibp"):
        raise ValueError(f"method must be 'ibp' or 'crown-ibp', got {method!r}")
    if not 0.0 <= kappa <= 1.0:
        raise ValueError(f"kappa must be in [0, 1], got {kappa}")
    if epochs < 1 or warmup < 0 or ramp < 0:
        raise ValueError(
            f"need epochs >= 1, warmup >= 0, ramp >= 0; got {epochs}, {warmup}, {ramp}"
        )
    X, y = data
    if X.ndim != 4 or y.shape != (len(X),) or len(X) == 0:
        raise ValueError(
            f"data must be X [N, C, H, W] and y [N], got {tuple(X.shape)}, {tuple(y.shape)}"
        )
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batches = (len(X) + batch_size - 1) // batch_size
    log = RobustTrainLog()
    step = 0

    def loss_fn(xb: Tensor, yb: Tensor) -> Tensor:
        nonlocal step
        k, scale = schedule(step, warmup * batches, ramp * batches, kappa)
        step += 1
        return robust_loss(model, xb, yb, pert.scaled(scale), k, method)

    def validate() -> tuple[tuple[float, float], dict[str, str]]:
        v = bounds.verified_accuracy(model, val[0], val[1], pert, method, margin=True)
        log.val_verified.append(v.accuracy)
        log.val_clean.append(v.clean_accuracy)
        shown = {"ver": f"{v.accuracy:.3f}", "clean": f"{v.clean_accuracy:.3f}"}
        return (v.accuracy, v.clean_accuracy), shown

    # The batch order comes from ``gen``; the fork keeps anything else that draws from torch's
    # global generator during training seeded, without changing the caller's random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        log.loss, log.best_epoch = models.fit(
            model,
            (X, y),
            opt,
            loss_fn,
            epochs=epochs,
            gen=gen,
            batch_size=batch_size,
            validate=None if val is None else validate,
            after_epoch=model.eval,
            desc=f"robust train ({method})",
            progress=progress,
        )
    model.eval()
    return log
