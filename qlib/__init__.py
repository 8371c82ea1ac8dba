"""qlib: the library behind the book on the robustness of neural networks to quantisation.

Modules and packages (each a few public functions; import the one you need, nothing is
imported here):

- ``qlib.data``: data sets read from files that packages install (no downloads).
- ``qlib.models``: the MLPs and CNN of the book, the one training loop, evaluation, checkpoints.
- ``qlib.quant``: uniform quantisers and the perturbation model of the certification chapters.
- ``qlib.bounds``: sound bounds on the discrepancy between a float network and its quantised
  versions (values, per-layer rules, propagation, methods by name, measures).
- ``qlib.milp``: exact worst cases (one MILP formulation, HiGHS and Gurobi backends, the
  published bilinear model on SCIP).
- ``qlib.attack``: concrete quantised networks that give lower bounds (soundness checks).
- ``qlib.robust``: certified robust training; ``qlib.qat``: LSQ QAT and QAT-KURE;
  ``qlib.fixedpoint``: the published fixed-point post-training quantisation simulator.
- ``qlib.ptq``: post-training quantisation on one shared grid and layer loop (RTN, GPFQ, GPTQ);
  ``qlib.gpfq`` and ``qlib.gptq`` are short names for its two solvers.
- ``qlib.explore``: NSGA-II mixed-precision exploration (``python -m qlib.explore --help``).
- ``qlib.hdl``: the Verilog number converter's bit-exact model, simulation and synthesis.
- ``qlib.store``: the one SQLite results store; ``qlib.sweep``: the one resumable Dask runner.
- ``qlib.zoo``: the book's named, cached models; ``qlib.book``: the notebook runner
  (``bookpdf``: the PDF book, ``bookcheck``: the built book read in headless Chromium).
"""

__version__ = "0.1.0"

__all__ = [
    "attack",
    "book",
    "bookcheck",
    "bookpdf",
    "bounds",
    "data",
    "explore",
    "fixedpoint",
    "gpfq",
    "gptq",
    "hdl",
    "milp",
    "models",
    "ptq",
    "qat",
    "quant",
    "robust",
    "store",
    "sweep",
    "zoo",
]
