"""Post-training weight quantisation: RTN, GPFQ and GPTQ on one shared grid and one layer loop.

Every method quantises the Linear and Conv2d layers of a model one after another; for layer
``l`` it sees the layer input computed by the float network (``X``) and by the partially
quantised one (``X~``), and a per-layer solver turns the float weights into integer codes on a
grid shared by all methods.

Modules, in the order they build on each other: ``grid`` (the grid and the choice of its
scale), ``capture`` (layer inputs and their Gram matrices), ``results`` (codes, scales, the
export and the run log), ``loop`` (the layer loop and its ``Solver`` protocol), the solvers
``rtn``, ``gpfq`` and ``gptq``, and ``experiments`` (calibration draws, single-layer errors).
``qlib.gpfq`` and ``qlib.gptq`` re-export the two solvers' modules.
"""

from qlib.ptq import gpfq, gptq  # noqa: E402  (after the loop they build on)
from qlib.ptq.capture import (
    CovStats,
    LayerInputs,
    Patches,
    collect_inputs,
    find_layers,
    layer_inputs,
    unfold_input,
)
from qlib.ptq.experiments import calibration_indices, single_layer_errors
from qlib.ptq.grid import (
    AUTO_SCALARS,
    LEVELS,
    PublishedAlphabet,
    candidate_scalars,
    check_scalar,
    grid_steps,
    make_quantizer,
    round_codes,
)
from qlib.ptq.loop import (
    Bits,
    Calib,
    Retrain,
    Solver,
    check_calib,
    quantize_layers,
    resolve_bits,
    split_float_layers,
)
from qlib.ptq.results import LOG_COLUMNS, LayerResult, QuantizedModel, append_log, model_name
from qlib.ptq.rtn import rtn, rtn_solver

__all__ = [
    "AUTO_SCALARS",
    "LEVELS",
    "LOG_COLUMNS",
    "Bits",
    "Calib",
    "CovStats",
    "LayerInputs",
    "LayerResult",
    "Patches",
    "PublishedAlphabet",
    "QuantizedModel",
    "Retrain",
    "Solver",
    "append_log",
    "calibration_indices",
    "candidate_scalars",
    "check_calib",
    "check_scalar",
    "collect_inputs",
    "find_layers",
    "gpfq",
    "gptq",
    "grid_steps",
    "layer_inputs",
    "make_quantizer",
    "model_name",
    "quantize_layers",
    "resolve_bits",
    "round_codes",
    "rtn",
    "rtn_solver",
    "single_layer_errors",
    "split_float_layers",
    "unfold_input",
]
