"""Mixed-precision exploration: NSGA-II over per-layer bit widths (accuracy vs bits or DRAM energy).

Modules: ``workload`` (YAML schema), ``fakequant`` (ModelOpt fake quantisation), ``weather``
(corruptions), ``traffic`` (ZigZag and linear DRAM models), ``store`` (SQLite results and
cache), ``context`` (model, data, evaluator), ``problems`` (pymoo), ``run`` (NSGA-II driver),
``finetune`` (re-evaluation and retraining), ``certify`` (the per-layer box of a genome and
the certified objective). CLI: ``python -m qlib.explore --help``.
"""

from qlib.explore.workload import Workload, WorkloadError, load, override, parse

__all__ = ["Workload", "WorkloadError", "load", "override", "parse"]
