"""Witnesses: a solver's primal point rebuilt as one concrete perturbed network and replayed.

From the solver values of the input, every affine output and every ReLU output, layer by layer in
float64: the input offset ``dX`` is the solver's input (clipped into its box) minus the nominal
one; an affine layer reaches ``z`` with a weight delta constant along each row,
``ΔW_i = eps_w t_i 1^T`` and ``Δb_i = eps_b t_i`` (``t_i ∈ [-1, 1]``, a ``qlib.attack.RowDelta``),
which attains every value in the exact box ``W h + b ± (eps_w 1^T h + eps_b)``; the activation
offset is the solver's ``ĥ`` minus ``relu(z)`` (``min(relu(z), c)`` for a ReLU clipped at ``c``;
a clipped input's offset is taken from ``min(x, c)``; each layer has its own radii under a
``LayerPerturbation``). Each target is clipped into what the replayed
network can reach, so solver round-off never leaves the perturbation box. The network is then run
through ``qlib.attack.perturbed_forward`` (the ordinary forward pass); the replayed objective
must equal the solver's to ``TOLERANCE`` or ``WitnessMismatch`` is raised.

Only for MLPs: a Conv2d row delta would have to differ per output position (see formulation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from qlib import attack, bounds
from qlib.bounds.perlayer import clip_of, resolve
from qlib.milp.formulation import Program

__all__ = ["Witness", "WitnessMismatch", "TOLERANCE", "rebuild", "replay"]

TOLERANCE = 1e-6


class WitnessMismatch(RuntimeError):
    """A solver point did not replay: the result is rejected."""


@dataclass(frozen=True)
class Witness:
    """One perturbed network for one input: deltas with a leading sample dim of 1, as
    ``qlib.attack.perturbed_forward`` takes them, and its float64 logits ``[classes]``."""

    dX: Tensor
    dW: list
    db: list
    dA: list
    logits: Tensor


def rebuild(model: nn.Sequential, program: Program, values: np.ndarray) -> Witness:
    """The network behind solver ``values`` [cols] of ``program``, replayed in float64."""
    if not program.exact:
        raise ValueError(
            "witnesses exist only for exact programs (MLPs); a Conv2d program is a relaxation"
        )
    pert = program.pert
    net = bounds.layers(model, program.in_shape)
    resolved = resolve(net, pert)
    eps_x, input_clip = resolved.input.eps_input, clip_of(resolved.input)
    x0 = torch.from_numpy(program.x0)
    lo = torch.from_numpy(program.col_lo[program.input])
    hi = torch.from_numpy(program.col_hi[program.input])
    h = torch.minimum(torch.maximum(torch.from_numpy(values[program.input]), lo), hi)
    start = x0 if input_clip is None else torch.clamp(x0, max=input_clip)
    dX = torch.clamp(h - start, -eps_x, eps_x)
    h = torch.clamp(start + dX, 0.0, 1.0 if input_clip is None else None)
    dW, db, dA = [], [], []
    affine = {a.index: a for a in program.affine}
    relus = {r.index: r for r in program.relus}
    for i, layer in enumerate(net):
        p = resolved.layers[i]
        if isinstance(layer, bounds.Affine):
            W = layer.module.weight.detach().to(torch.float64)
            b = layer.bias(W).detach()
            nominal = W @ h + b
            radius = p.eps_weight * h.sum() + p.eps_bias
            target = torch.from_numpy(values[affine[i].z])
            if float(radius) > 0:
                t = torch.clamp((target - nominal) / radius, -1.0, 1.0)
            else:
                t = torch.zeros_like(nominal)
            dW.append(attack.RowDelta(t.unsqueeze(0), p.eps_weight) if p.eps_weight else None)
            db.append((p.eps_bias * t).unsqueeze(0) if p.eps_bias else None)
            h = nominal + p.eps_weight * t * h.sum() + p.eps_bias * t
        elif isinstance(layer, bounds.ReLU):
            r = torch.relu(h)
            if clip_of(p) is not None:
                r = torch.clamp(r, max=clip_of(p))
            target = torch.from_numpy(values[relus[i].h])
            d = torch.clamp(target - r, -p.eps_act, p.eps_act)
            d = torch.maximum(d, -r)  # ĥ >= 0
            dA.append(d.unsqueeze(0) if p.eps_act else None)
            h = r + d if p.eps_act else r
    with torch.no_grad():
        logits = attack.perturbed_forward(
            model,
            x0.reshape(1, *program.in_shape),
            pert,
            dW=dW,
            db=db,
            dA=dA,
            dX=dX.reshape(1, *program.in_shape) if eps_x else None,
        )[0]
    return Witness(dX.reshape(program.in_shape), dW, db, dA, logits)


def replay(
    model: nn.Sequential,
    program: Program,
    values: np.ndarray,
    c_logits: np.ndarray,
    solver_value: float,
    what: str,
) -> Witness:
    """Rebuild the witness and check that ``c_logits · logits`` equals ``solver_value``."""
    w = rebuild(model, program, values)
    replayed = float(torch.as_tensor(c_logits, dtype=torch.float64) @ w.logits)
    if not abs(replayed - solver_value) <= TOLERANCE:
        raise WitnessMismatch(
            f"{what}: the solver's point replays to {replayed!r} through the ordinary forward "
            f"pass, the solver says {solver_value!r} (difference {abs(replayed - solver_value):.3g}"
            f" > {TOLERANCE}); the result is rejected"
        )
    return w
