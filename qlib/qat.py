"""Quantisation-aware training (QAT) with the LSQ quantiser, and QAT with the kurtosis
regulariser KURE: the two alternatives to certified robust training in the published comparison.

LSQ (Esser et al., ICLR 2020): every weight tensor and every input of a Linear or Conv2d layer
(the image, then each hidden activation) is fake-quantised with a learned step ``s``:
``q(v) = round(clamp(v / s, -Q_n, Q_p)) * s``, signed grids ``Q_n = 2^(b-1)``,
``Q_p = 2^(b-1) - 1`` for weights, unsigned ``Q_n = 0``, ``Q_p = 2^b - 1`` for the
(non-negative) layer inputs. Rounding passes the gradient straight through (STE); the step's
gradient is scaled by ``g = 1 / sqrt(numel * Q_p)`` (``numel``: entries of the weight tensor,
or features of one input sample), and ``s`` starts at ``2 mean|v| / sqrt(Q_p)`` on the first
batch. Biases stay in float, as in LSQ.

KURE (Shkolnik et al., NeurIPS 2020): ``lambda * mean_l (Kurt(W_l) - 1.8)^2`` added to the loss,
``Kurt(W) = E[((W - mu) / sigma)^4]`` over each weight tensor; 1.8 is the kurtosis of a uniform
distribution, which rounding to a uniform grid tolerates best.

The fake-quantised forward wraps the plain ``nn.Sequential`` (``QATNet``), so training runs
through ``qlib.models.train_epoch`` like every other method, the epoch is chosen with
``qlib.models.BestEpoch`` on the validation accuracy of the fake-quantised network (what QAT
optimises), and the exported model is the wrapped network's float weights with the steps
dropped, as published: every method then enters the same post-training evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlib import models

__all__ = [
    "KURE_TARGET",
    "LSQ",
    "QATLog",
    "QATNet",
    "kure_penalty",
    "kurtosis",
    "lsq_quantize",
    "train",
]

KURE_TARGET = 1.8
Data = tuple[Tensor, Tensor]


def _check_bits(name: str, bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"{name} must be an integer in [2, 16], got {bits!r}")
    return bits


def _grad_scale(x: Tensor, g: float) -> Tensor:
    """``x`` in the forward pass, gradient times ``g`` in the backward pass."""
    return (x - x * g).detach() + x * g


def _round_ste(x: Tensor) -> Tensor:
    """Round to nearest with the straight-through gradient 1."""
    return (x.round() - x).detach() + x


def lsq_quantize(x: Tensor, step: Tensor, qn: int, qp: int, numel: int) -> Tensor:
    """LSQ fake quantisation of ``x`` (any shape) on the grid ``step * {-qn, ..., qp}``.

    Gradients: straight through the rounding inside the clip range, 0 outside; ``step`` gets
    LSQ's gradient scaled by ``1 / sqrt(numel * qp)``.
    """
    s = _grad_scale(step, 1.0 / math.sqrt(numel * qp))
    return _round_ste(torch.clamp(x / s, -qn, qp)) * s


class LSQ(nn.Module):
    """A learned-step quantiser: signed (weights) or unsigned (non-negative layer inputs)."""

    def __init__(self, bits: int, signed: bool) -> None:
        super().__init__()
        self.bits = _check_bits("bits", bits)
        self.signed = signed
        self.qn = 2 ** (bits - 1) if signed else 0
        self.qp = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
        self.step = nn.Parameter(torch.tensor(1.0))
        # Whether ``step`` holds its data-dependent initial value yet (saved with the weights).
        self.register_buffer("initialised", torch.tensor(False))

    def forward(self, x: Tensor, numel: int) -> Tensor:
        if not bool(self.initialised):
            with torch.no_grad():
                init = 2 * x.detach().abs().mean() / math.sqrt(self.qp)
                self.step.copy_(init.clamp(min=1e-8))
                self.initialised.fill_(True)
        return lsq_quantize(x, self.step, self.qn, self.qp, numel)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}"


class QATNet(nn.Module):
    """``net`` (an ``nn.Sequential`` of Flatten, Linear, Conv2d, ReLU) with LSQ fake quantisation
    of every affine layer's weights (``bits``) and input (``act_bits``).

    ``net`` itself is never modified in structure: after training it holds the float weights
    (the export, ``QATNet.net``).
    """

    def __init__(self, net: nn.Sequential, bits: int = 8, act_bits: int | None = None) -> None:
        super().__init__()
        if not isinstance(net, nn.Sequential):
            raise TypeError(f"QAT needs an nn.Sequential network, got {type(net).__name__}")
        act_bits = bits if act_bits is None else act_bits
        _check_bits("bits", bits), _check_bits("act_bits", act_bits)
        for i, m in enumerate(net):
            if not isinstance(m, nn.Flatten | nn.Linear | nn.Conv2d | nn.ReLU):
                raise ValueError(
                    f"layer {i} ({type(m).__name__}): QAT supports Flatten, Linear, Conv2d, ReLU"
                )
        self.net = net
        self.bits, self.act_bits = bits, act_bits
        affine = [i for i, m in enumerate(net) if isinstance(m, nn.Linear | nn.Conv2d)]
        if not affine:
            raise ValueError("the network has no Linear or Conv2d layer to quantise")
        self.weight_q = nn.ModuleDict({str(i): LSQ(bits, signed=True) for i in affine})
        self.input_q = nn.ModuleDict({str(i): LSQ(act_bits, signed=False) for i in affine})

    def forward(self, x: Tensor) -> Tensor:
        for i, m in enumerate(self.net):
            key = str(i)
            if key in self.weight_q:
                x = self.input_q[key](x, x[0].numel())
                w = self.weight_q[key](m.weight, m.weight.numel())
                if isinstance(m, nn.Linear):
                    x = F.linear(x, w, m.bias)
                else:
                    x = F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
            else:
                x = m(x)
        return x


def kurtosis(w: Tensor) -> Tensor:
    """``E[((w - mu) / sigma)^4]`` over all entries of ``w`` (a scalar tensor)."""
    z = (w - w.mean()) / w.std()
    return (z**4).mean()


def kure_penalty(model: nn.Module, target: float = KURE_TARGET) -> Tensor:
    """``mean_l (Kurt(W_l) - target)^2`` over the Linear and Conv2d weights of ``model``."""
    ws = [m.weight for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    if not ws:
        raise ValueError("the model has no Linear or Conv2d weights for KURE")
    return torch.stack([(kurtosis(w) - target) ** 2 for w in ws]).mean()


@dataclass
class QATLog:
    """Per-epoch training loss, KURE penalty and (with ``val``) fake-quantised accuracy."""

    loss: list[float] = field(default_factory=list)
    kure: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int | None = None


def train(
    model: nn.Sequential,
    data: Data,
    *,
    bits: int = 8,
    act_bits: int | None = None,
    kure: float = 0.0,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 128,
    val: Data | None = None,
    seed: int = 0,
    progress: bool = True,
) -> QATLog:
    """QAT (``kure = 0``) or QAT-KURE (``kure = lambda > 0``, published 1.0) of ``model`` in place.

    ``data`` = (X [N, C, H, W] in [0, 1], y [N]). Adam with cosine decay, the schedule of
    ``qlib.models.train``. With ``val`` the epoch with the best fake-quantised validation
    accuracy is kept. ``model`` ends with the float weights of that epoch (the LSQ steps are
    dropped); ``QATLog`` says what happened.
    """
    if not isinstance(kure, int | float) or not math.isfinite(kure) or kure < 0:
        raise ValueError(f"kure (lambda) must be a finite number >= 0, got {kure!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    X, y = models._check_data(data, "data")
    qnet = QATNet(model, bits, act_bits)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(qnet.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    log = QATLog()
    penalties: list[float] = []

    def loss_fn(xb: Tensor, yb: Tensor) -> Tensor:
        loss = F.cross_entropy(qnet(xb), yb)
        if kure:
            penalty = kure_penalty(model)
            penalties.append(penalty.item())
            loss = loss + kure * penalty
        return loss

    def after_epoch() -> None:
        log.kure.append(sum(penalties) / len(penalties) if penalties else 0.0)
        penalties.clear()

    def validate() -> tuple[float, dict[str, str]]:
        acc = models.evaluate(qnet, val)
        log.val_accuracy.append(acc)
        return acc, {"val": f"{acc:.3f}"}

    name = "QAT-KURE" if kure else "QAT"
    log.loss, log.best_epoch = models.fit(
        qnet,
        (X, y),
        opt,
        loss_fn,
        epochs=epochs,
        gen=gen,
        batch_size=batch_size,
        sched=sched,
        validate=None if val is None else validate,
        after_epoch=after_epoch,
        desc=f"{name} W{bits}",
        progress=progress,
    )
    model.eval()
    return log
