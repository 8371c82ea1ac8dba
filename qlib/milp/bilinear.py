"""The published formulation (Dang et al., AISTATS 2025): weights and biases as variables.

Every weight ``Ŵ_ij ∈ [W_ij - eps_w, W_ij + eps_w]`` and bias is a variable and each layer is the
bilinear equation ``ẑ_i = Σ_j Ŵ_ij h_j + b̂_i``: a non-convex mixed-integer quadratically
constrained program, solved here by SCIP (``pyscipopt``, spatial branch-and-bound) or by Gurobi
with ``NonConvex`` (only within its licence's size). The ReLU encoding and the bounds of every
variable are those of the MILP ``Program`` it is built beside, so the two differ only in how
the affine layers are written; their optima must agree (the MILP is exact for MLPs).

Solutions are returned in the MILP program's column space (input, affine outputs, ReLU outputs;
other columns NaN), so ``qlib.milp.witness`` replays them unchanged.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from qlib import bounds
from qlib.milp.backends import (
    FEASIBILITY_TOL,
    Outcome,
    SolverUnavailable,
    _gurobi_optimize,
    _gurobipy,
    _infeasible,
)
from qlib.milp.formulation import Program

__all__ = ["ScipBilinear", "GurobiBilinear", "BILINEAR_BACKENDS"]


def _emit(model: nn.Sequential, program: Program, var, cons, quicksum) -> tuple[dict, list]:
    """Build the bilinear program through ``var(lo, hi, binary) -> v`` and ``cons(relation)``;
    returns ``{program column: solver variable}`` and the logit variables."""
    pert = program.pert
    net = bounds.layers(model, program.in_shape)
    cols: dict[int, object] = {}
    h = []
    for j in program.input:
        v = var(program.col_lo[j], program.col_hi[j], False)
        cols[int(j)] = v
        h.append(v)
    affine = {a.index: a for a in program.affine}
    relus = {r.index: r for r in program.relus}
    for i, layer in enumerate(net):
        if isinstance(layer, bounds.Affine):
            if not isinstance(layer, bounds.Linear):
                raise ValueError(
                    f"layer {i} ({type(layer.module).__name__}): the bilinear formulation "
                    "covers Linear layers only"
                )
            W = layer.module.weight.detach().to(torch.float64).numpy()
            b = layer.bias(torch.zeros(1, dtype=torch.float64)).detach().numpy()
            zs = []
            for r, zi in enumerate(affine[i].z):
                if pert.eps_weight:
                    w = [
                        var(W[r, j] - pert.eps_weight, W[r, j] + pert.eps_weight, False)
                        for j in range(W.shape[1])
                    ]
                else:
                    w = list(W[r])
                bias = (
                    var(b[r] - pert.eps_bias, b[r] + pert.eps_bias, False)
                    if pert.eps_bias
                    else b[r]
                )
                z = var(program.col_lo[zi], program.col_hi[zi], False)
                cons(z == quicksum(wj * hj for wj, hj in zip(w, h, strict=True)) + bias)
                cols[int(zi)] = z
                zs.append(z)
            h = zs
        elif isinstance(layer, bounds.ReLU):
            rv = relus[i]
            out = []
            for k, hk in enumerate(rv.h):
                z = h[k]
                hv = var(program.col_lo[hk], program.col_hi[hk], False)
                cols[int(hk)] = hv
                if rv.phase[k] == 1:
                    a = z
                elif rv.phase[k] == -1:
                    a = 0.0
                else:  # big-M with the same bounds as the MILP (Tjeng et al.)
                    lo, up = rv.lower[k], rv.upper[k]
                    d = var(0.0, 1.0, True)
                    a = var(0.0, up, False)
                    cons(a >= z)
                    cons(a <= z - lo * (1 - d))
                    cons(a <= up * d)
                cons(hv - a <= pert.eps_act)
                cons(hv - a >= -pert.eps_act)
                out.append(hv)
            h = out
    return cols, h


class ScipBilinear:
    """The bilinear program solved by SCIP; ``minimize`` takes costs in ``program`` columns
    (only logit columns may be non-zero). Stop values are not supported (ignored)."""

    name = "scip"

    def __init__(
        self,
        model: nn.Sequential,
        program: Program,
        *,
        threads: int = 1,
        rel_gap: float = 1e-6,
        abs_gap: float = 1e-7,
    ) -> None:
        try:
            import pyscipopt
        except ImportError as e:
            raise SolverUnavailable(
                "the bilinear formulation needs SCIP through pyscipopt: pip install pyscipopt"
            ) from e
        self.program = program
        m = pyscipopt.Model()
        m.hideOutput()
        m.setParam("limits/gap", rel_gap)
        m.setParam("limits/absgap", abs_gap)
        m.setParam("numerics/feastol", FEASIBILITY_TOL)

        def var(lo, hi, binary):
            return m.addVar(lb=lo, ub=hi, vtype="B" if binary else "C")

        self._cols, self._logits = _emit(model, program, var, m.addCons, pyscipopt.quicksum)
        self._m, self._q = m, pyscipopt.quicksum

    def minimize(self, c, *, time_limit=None, stop_bound_above=None, stop_primal_below=None):
        m = self._m
        m.freeTransform()
        expr = self._q(float(c[j]) * v for j, v in self._cols.items() if c[j] != 0)
        m.setObjective(expr, "minimize")
        m.setParam("limits/time", float(time_limit) if time_limit else 1e20)
        t0 = time.perf_counter()
        m.optimize()
        seconds = time.perf_counter() - t0
        status = m.getStatus()
        if status in ("infeasible", "inforunbd"):
            raise _infeasible("SCIP (bilinear)")
        kind = {"optimal": "optimal", "gaplimit": "optimal", "timelimit": "time_limit"}.get(status)
        if kind is None:
            raise RuntimeError(f"SCIP ended with status {status!r}")
        values, primal = None, math.inf
        if m.getNSols() > 0:
            sol = m.getBestSol()
            values = np.full(self.program.n_vars, np.nan)
            for j, v in self._cols.items():
                values[j] = m.getSolVal(sol, v)
            primal = float(m.getSolObjVal(sol))
        return Outcome(kind, float(m.getDualbound()), primal, values, seconds, int(m.getNNodes()))


class GurobiBilinear:
    """The bilinear program solved by Gurobi with ``NonConvex=2``; the pip licence's 2,000
    variable limit admits only tiny networks (``LicenceTooSmall`` otherwise)."""

    name = "gurobi"

    def __init__(
        self,
        model: nn.Sequential,
        program: Program,
        *,
        threads: int = 1,
        rel_gap: float = 1e-6,
        abs_gap: float = 1e-7,
    ) -> None:
        gp = _gurobipy()
        self.program = program
        env = gp.Env(empty=True)
        env.setParam("OutputFlag", 0)
        env.start()
        m = gp.Model(env=env)
        m.Params.NonConvex = 2
        m.Params.Threads = int(threads)
        m.Params.MIPGap = rel_gap
        m.Params.MIPGapAbs = abs_gap
        m.Params.FeasibilityTol = FEASIBILITY_TOL
        m.Params.IntFeasTol = FEASIBILITY_TOL

        def var(lo, hi, binary):
            return m.addVar(lb=lo, ub=hi, vtype=gp.GRB.BINARY if binary else gp.GRB.CONTINUOUS)

        self._cols, self._logits = _emit(model, program, var, m.addConstr, gp.quicksum)
        m.update()
        self._m, self._gp = m, gp

    def minimize(self, c, *, time_limit=None, stop_bound_above=None, stop_primal_below=None):
        gp, m = self._gp, self._m
        keys = list(self._cols)
        m.setObjective(gp.quicksum(float(c[j]) * self._cols[j] for j in keys if c[j] != 0))
        m.Params.TimeLimit = float(time_limit) if time_limit else gp.GRB.INFINITY
        m.Params.BestBdStop = gp.GRB.INFINITY if stop_bound_above is None else stop_bound_above
        m.Params.BestObjStop = -gp.GRB.INFINITY if stop_primal_below is None else stop_primal_below

        class _X:  # the columns' values in program space, as _gurobi_optimize reads them
            @property
            def X(self_inner):
                values = np.full(self.program.n_vars, np.nan)
                for j in keys:
                    values[j] = self._cols[j].X
                return values

        return _gurobi_optimize(m, _X(), "Gurobi (bilinear, NonConvex)")


BILINEAR_BACKENDS = {"scip": ScipBilinear, "gurobi": GurobiBilinear}
