"""qlib: the library behind the book on the robustness of neural networks to quantisation.

Modules (each a few public functions):

- ``qlib.data``: data sets read from files that packages install (no downloads).
- ``qlib.models``: the MLPs and CNN of the book, training, evaluation, cached checkpoints.
- ``qlib.quant``: uniform quantisers and the perturbation model of the certification chapter.
- ``qlib.bounds``: sound bounds on the discrepancy between a float network and its quantised versions.
- ``qlib.attack``: concrete quantised networks that give lower bounds (soundness checks).
- ``qlib.robust``: certified robust training.
- ``qlib.ptq``, ``qlib.gpfq``, ``qlib.gptq``: post-training quantisation on one shared grid.
- ``qlib.explore``: NSGA-II mixed-precision exploration (``python -m qlib.explore --help``).
- ``qlib.zoo``: the book's named, cached models; ``qlib.book``: the notebook runner.
"""

__version__ = "0.1.0"
