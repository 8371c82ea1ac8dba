"""Thin solver backends: each loads a ``Program`` once and minimises one cost vector at a time.

A backend only translates; the formulation is ``qlib.milp.formulation``. ``HiGHS`` (through
``highspy``, open source) is the default; ``Gurobi`` (through ``gurobipy``) runs within the
2,000-variable/constraint limit of the licence bundled with the pip package, or fully licensed.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from qlib.milp.formulation import Program

__all__ = [
    "Outcome",
    "Backend",
    "HighsBackend",
    "GurobiBackend",
    "BACKENDS",
    "make_backend",
    "SolverUnavailable",
    "LicenceTooSmall",
    "InfeasibleModel",
    "FEASIBILITY_TOL",
]

# Tight tolerances: a witness must replay to 1e-6, so the solver's own slack has to be far below.
FEASIBILITY_TOL = 1e-9


class SolverUnavailable(RuntimeError):
    """The requested solver package is not installed or cannot run."""


class LicenceTooSmall(RuntimeError):
    """The Gurobi licence limits the model size (the pip licence: 2,000 variables/constraints)."""


class InfeasibleModel(RuntimeError):
    """The solver found the program infeasible: the nominal network is always feasible, so this
    is a bug in the formulation or in the bounds it was built from."""


@dataclass(frozen=True)
class Outcome:
    """One minimisation: ``status`` is ``"optimal"``, ``"time_limit"`` or ``"stopped"`` (a stop
    value was reached); ``bound`` is the proven lower bound (the dual bound: sound even after a
    time-out), ``primal`` the best value found (inf if none) with its variables ``values``."""

    status: str
    bound: float
    primal: float
    values: np.ndarray | None
    seconds: float
    nodes: int


class Backend(Protocol):
    """Loads one ``Program``; ``minimize`` can be called for many cost vectors."""

    name: str

    def minimize(
        self,
        c: np.ndarray,
        *,
        time_limit: float | None = None,
        stop_bound_above: float | None = None,
        stop_primal_below: float | None = None,
    ) -> Outcome:
        """Minimise ``c^T v`` [cols]. Stops early once the proven bound exceeds
        ``stop_bound_above`` or a solution is below ``stop_primal_below``."""
        ...


def _infeasible(name: str) -> InfeasibleModel:
    return InfeasibleModel(
        f"{name} reports the program infeasible, but the nominal network is always a feasible "
        "point: this is a bug (in the formulation or in the pre-activation bounds it used); "
        "please report it with the model and input"
    )


class HighsBackend:
    """HiGHS through ``highspy``; ``threads`` 1 by default (sweeps parallelise over tasks)."""

    name = "highs"

    def __init__(
        self, program: Program, *, threads: int = 1, rel_gap: float = 1e-6, abs_gap: float = 1e-7
    ) -> None:
        try:
            import highspy
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise SolverUnavailable("the HiGHS backend needs highspy: pip install highspy") from e
        self._hp = highspy
        self.program = program
        h = _quiet_highs(highspy)
        h.setOptionValue("output_flag", False)
        h.setOptionValue("threads", int(threads))
        h.setOptionValue("mip_rel_gap", float(rel_gap))
        h.setOptionValue("mip_abs_gap", float(abs_gap))
        h.setOptionValue("mip_feasibility_tolerance", FEASIBILITY_TOL)
        h.setOptionValue("primal_feasibility_tolerance", FEASIBILITY_TOL)
        # Sub-MIP heuristics (RENS, RINS, root reduced cost) took most of the time on these
        # programs (few binaries, a dense first layer): measured 2-3x slower with them.
        for heuristic in ("rens", "rins", "root_reduced_cost"):
            h.setOptionValue(f"mip_heuristic_run_{heuristic}", False)
        A = program.A.tocsc()
        lp = highspy.HighsLp()
        lp.num_col_ = program.n_vars
        lp.num_row_ = program.n_rows
        lp.col_cost_ = np.zeros(program.n_vars)
        lp.col_lower_ = program.col_lo
        lp.col_upper_ = program.col_hi
        lp.row_lower_ = program.row_lo
        lp.row_upper_ = program.row_hi
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = A.indptr
        lp.a_matrix_.index_ = A.indices
        lp.a_matrix_.value_ = A.data
        lp.integrality_ = [
            highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
            for i in program.integer
        ]
        h.passModel(lp)
        self._h = h
        self._stop: tuple[float, float] = (math.inf, -math.inf)
        h.cbMipInterrupt.subscribe(self._interrupt)

    def _interrupt(self, e) -> None:
        above, below = self._stop
        out = e.data_out
        if out.mip_dual_bound > above or out.objective_function_value < below:
            e.interrupt()

    def start(self, values: np.ndarray) -> None:
        """A feasible point [cols] to start the next solve from (e.g. an earlier solution)."""
        sol = self._hp.HighsSolution()
        sol.col_value = list(map(float, values))
        sol.value_valid = True
        self._h.setSolution(sol)

    def minimize(self, c, *, time_limit=None, stop_bound_above=None, stop_primal_below=None):
        h, hp = self._h, self._hp
        n = self.program.n_vars
        h.changeColsCost(n, np.arange(n, dtype=np.int32), np.asarray(c, float))
        h.setOptionValue("time_limit", float(time_limit) if time_limit else math.inf)
        self._stop = (
            math.inf if stop_bound_above is None else stop_bound_above,
            -math.inf if stop_primal_below is None else stop_primal_below,
        )
        t0 = time.perf_counter()
        h.run()
        seconds = time.perf_counter() - t0
        status = h.getModelStatus()
        info = h.getInfo()
        S = hp.HighsModelStatus
        if status in (S.kInfeasible, S.kUnboundedOrInfeasible):
            raise _infeasible("HiGHS")
        if status == S.kOptimal:
            kind = "optimal"
        elif status == S.kTimeLimit:
            kind = "time_limit"
        elif status == S.kInterrupt:
            kind = "stopped"
        else:
            raise RuntimeError(f"HiGHS ended with status {h.modelStatusToString(status)!r}")
        values = None
        primal = math.inf
        if info.primal_solution_status == 2:  # kSolutionStatusFeasible
            values = np.array(h.getSolution().col_value)
            primal = float(info.objective_function_value)
        bound = float(info.mip_dual_bound)
        if self.program.n_binary == 0:  # an LP: HiGHS reports no MIP dual bound
            bound = primal if kind == "optimal" else -math.inf
        return Outcome(kind, bound, primal, values, seconds, int(info.mip_node_count))


_BANNER_DONE = False


def _quiet_highs(highspy):
    """A new ``highspy.Highs``; the first one of a process prints a banner to the C-level stdout
    before any option can silence it (into notebooks and worker logs), so that one is muted."""
    global _BANNER_DONE
    if _BANNER_DONE:
        return highspy.Highs()
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            h = highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    _BANNER_DONE = True
    return h


class GurobiBackend:
    """Gurobi through ``gurobipy``; raises ``LicenceTooSmall`` naming HiGHS when the licence
    cannot hold the program."""

    name = "gurobi"

    def __init__(
        self, program: Program, *, threads: int = 1, rel_gap: float = 1e-6, abs_gap: float = 1e-7
    ) -> None:
        gp = _gurobipy()
        self.program = program
        env = gp.Env(empty=True)
        env.setParam("OutputFlag", 0)
        env.start()
        m = gp.Model(env=env)
        m.Params.Threads = int(threads)
        m.Params.MIPGap = float(rel_gap)
        m.Params.MIPGapAbs = float(abs_gap)
        m.Params.FeasibilityTol = FEASIBILITY_TOL
        m.Params.IntFeasTol = FEASIBILITY_TOL
        vtype = np.where(program.integer, gp.GRB.BINARY, gp.GRB.CONTINUOUS)
        lo = np.where(np.isinf(program.col_lo), -gp.GRB.INFINITY, program.col_lo)
        hi = np.where(np.isinf(program.col_hi), gp.GRB.INFINITY, program.col_hi)
        x = m.addMVar(program.n_vars, lb=lo, ub=hi, vtype=vtype)
        A = program.A
        fin_hi = np.isfinite(program.row_hi)
        fin_lo = np.isfinite(program.row_lo)
        eq = fin_hi & fin_lo & (program.row_lo == program.row_hi)
        if eq.any():
            m.addConstr(A[eq] @ x == program.row_hi[eq])
        if (fin_hi & ~eq).any():
            m.addConstr(A[fin_hi & ~eq] @ x <= program.row_hi[fin_hi & ~eq])
        if (fin_lo & ~eq).any():
            m.addConstr(A[fin_lo & ~eq] @ x >= program.row_lo[fin_lo & ~eq])
        m.update()
        self._gp, self._m, self._x = gp, m, x

    def start(self, values: np.ndarray) -> None:
        """A feasible point [cols] to start the next solve from."""
        self._x.Start = np.asarray(values, float)

    def minimize(self, c, *, time_limit=None, stop_bound_above=None, stop_primal_below=None):
        gp, m, x = self._gp, self._m, self._x
        m.setObjective(np.asarray(c, float) @ x, gp.GRB.MINIMIZE)
        m.Params.TimeLimit = float(time_limit) if time_limit else gp.GRB.INFINITY
        m.Params.BestBdStop = gp.GRB.INFINITY if stop_bound_above is None else stop_bound_above
        m.Params.BestObjStop = -gp.GRB.INFINITY if stop_primal_below is None else stop_primal_below
        return _gurobi_optimize(m, x, "Gurobi")


def _gurobipy():
    try:
        import gurobipy as gp
    except ImportError as e:
        raise SolverUnavailable(
            "the Gurobi backend needs gurobipy (pip install gurobipy); use solver='highs'"
        ) from e
    return gp


def _gurobi_optimize(m, x, name: str) -> Outcome:
    gp = _gurobipy()
    t0 = time.perf_counter()
    try:
        m.optimize()
    except gp.GurobiError as e:
        if e.errno == gp.GRB.Error.SIZE_LIMIT_EXCEEDED:
            raise LicenceTooSmall(
                f"{name}: model too large for the Gurobi licence ({m.NumVars} variables, "
                f"{m.NumConstrs + m.NumQConstrs} constraints; the pip licence allows 2,000): "
                "use the HiGHS backend (solver='highs') or a full Gurobi licence"
            ) from e
        if e.errno in (gp.GRB.Error.NO_LICENSE, gp.GRB.Error.LICENSE_EXPIRED):
            raise SolverUnavailable(f"{name}: no usable Gurobi licence ({e})") from e
        raise
    seconds = time.perf_counter() - t0
    S = gp.GRB.Status
    if m.Status in (S.INFEASIBLE, S.INF_OR_UNBD):
        raise _infeasible(name)
    kind = {S.OPTIMAL: "optimal", S.TIME_LIMIT: "time_limit", S.USER_OBJ_LIMIT: "stopped"}.get(
        m.Status
    )
    if kind is None:
        raise RuntimeError(f"{name} ended with status code {m.Status}")
    values, primal = None, math.inf
    if m.SolCount > 0:
        values = np.asarray(x.X, float)
        primal = float(m.ObjVal)
    bound = float(m.ObjBound) if m.IsMIP or m.IsQCP else primal
    return Outcome(kind, bound, primal, values, seconds, int(m.NodeCount) if m.IsMIP else 0)


BACKENDS = {"highs": HighsBackend, "gurobi": GurobiBackend}


def make_backend(solver: str, program: Program, **options) -> Backend:
    """The backend ``solver`` ("highs" or "gurobi") loaded with ``program``."""
    if solver not in BACKENDS:
        raise ValueError(f"solver must be one of {tuple(BACKENDS)}, got {solver!r}")
    return BACKENDS[solver](program, **options)
