"""Everything one evaluation needs, built once from a workload: model, data, calibrated ranges.

``prepare(w)`` loads the model and data, calibrates, measures the float baseline and returns a
``Prepared`` whose ``evaluator`` maps a genome to (accuracy, cost). The evaluator is plain
data (float weights, ranges, data tensors) so it pickles to Dask workers, which rebuild the
ModelOpt network once per process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from qlib import data, models, zoo
from qlib.bounds.base import checked_once
from qlib.explore import certify, fakequant, traffic, weather
from qlib.explore.workload import DatasetSpec, Workload

__all__ = [
    "Evaluator",
    "Prepared",
    "bit_cost",
    "calibrate",
    "certifier",
    "load_data",
    "load_model",
    "prepare",
]


log = logging.getLogger(__name__)

Data = tuple[Tensor, Tensor]


def load_model(w: Workload, progress: bool = False) -> nn.Sequential:
    """The workload's float model: the registry's trained model, or its checkpoint file."""
    if w.model.checkpoint is not None:
        return models.load(w.model.checkpoint, zoo.recipe(w.model.name).arch)
    return zoo.get(
        w.model.name, epochs=w.model.epochs, train_limit=w.model.train_limit, progress=progress
    )


def load_data(spec: DatasetSpec, limit: int | None = None) -> Data:
    """``spec``'s samples (``offset``, ``limit``), weather-corrupted if the spec says so."""
    n = spec.limit if limit is None else min(limit, spec.limit or limit)
    end = None if n is None else spec.offset + n
    X, y = data.load(spec.dataset, spec.split, limit=end)
    X, y = X[spec.offset :], y[spec.offset :]
    if spec.weather is not None:
        X = weather.corrupt(
            X, spec.weather.condition, spec.weather.severity, seed=spec.weather.seed
        )
    return X, y


def bit_cost(genome: Sequence[int], weighting: str) -> float:
    """``sum``: total bits; ``published``: 0.5 x weight bits + 5 x input bits (SOCC'23)."""
    if weighting == "sum":
        return float(sum(genome))
    if weighting == "published":
        return 5.0 * sum(genome[0::2]) + 0.5 * sum(genome[1::2])
    raise ValueError(f"unknown bit weighting {weighting!r}; expected 'sum' or 'published'")


@dataclass
class Evaluator:
    """Maps a genome to (accuracy on the exploration data, cost); picklable."""

    arch: dict
    state_dict: dict
    input_amax: dict[str, float]
    conv_only: bool
    X: Tensor
    y: Tensor
    problem: str
    weighting: str
    energy_model: str = "linear"
    accelerator: str = "eyeriss_like"
    mapping: str = "default"
    batch_size: int = 1024
    threads: int | None = None
    certifier: certify.Certifier | None = None
    _net: fakequant.QuantNet | None = field(default=None, repr=False)
    _shapes: list | None = field(default=None, repr=False)
    _float: nn.Sequential | None = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        # ModelOpt modules do not pickle; each process rebuilds its own network.
        return {k: v for k, v in self.__dict__.items() if k not in ("_net", "_shapes", "_float")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _net=None, _shapes=None, _float=None)

    @property
    def net(self) -> fakequant.QuantNet:
        if self._net is None:
            if self.threads:
                torch.set_num_threads(self.threads)  # avoid oversubscribing shared cores
            model = models.build(self.arch)
            model.load_state_dict(self.state_dict)
            self._net = fakequant.restore(model, self.input_amax, conv_only=self.conv_only)
            self._shapes = traffic.layer_shapes(model, self.X.shape[1:], self.conv_only)
        return self._net

    @property
    def shapes(self) -> list[traffic.LayerShape]:
        """The quantised layers' shapes, in genome order (built with the network)."""
        self.net  # noqa: B018 - builds the layer shapes
        return self._shapes

    def traffic(
        self, genome: Sequence[int], model: str | None = None
    ) -> list[traffic.LayerTraffic]:
        """Per-layer DRAM traffic of one inference, in this evaluator's traffic model or ``model``
        (``"linear"`` or ``"zigzag"``) on its accelerator."""
        return traffic.network_traffic(
            self.shapes,
            genome,
            model=model or self.energy_model,
            accelerator=self.accelerator,
            mapping=self.mapping,
        )

    def dram_bytes(self, genome: Sequence[int], model: str | None = None) -> float:
        """Total DRAM traffic of one inference, in bytes."""
        return sum(t.total_bits for t in self.traffic(genome, model)) / 8

    def energy_uj(self, genome: Sequence[int], model: str | None = None) -> float:
        """DRAM energy of one inference, in uJ."""
        return sum(t.energy_pj for t in self.traffic(genome, model)) / 1e6

    def cost(self, genome: Sequence[int]) -> float:
        """Second objective: weighted bits, or DRAM energy (uJ) of one inference."""
        if self.problem == "quantization_problem":
            return bit_cost(genome, self.weighting)
        return self.energy_uj(genome)

    def accuracy(self, genome: Sequence[int]) -> float:
        net = self.net
        net.set_bits(genome)
        correct = 0
        with torch.no_grad(), net.frozen_weights():
            for i in range(0, len(self.X), self.batch_size):
                correct += (
                    (
                        net.model(self.X[i : i + self.batch_size]).argmax(1)
                        == self.y[i : i + self.batch_size]
                    )
                    .sum()
                    .item()
                )
        return correct / len(self.X)

    @property
    def float_model(self) -> nn.Sequential:
        """The float network the certificates bound around."""
        if self._float is None:
            model = models.build(self.arch)
            model.load_state_dict(self.state_dict)
            self._float = model.eval()
        return self._float

    def box(self, genome: Sequence[int]):
        """The ``LayerPerturbation`` containing the fake-quantised network of ``genome``."""
        return certify.genome_box(self.net, genome)

    def certify(self, genome: Sequence[int]) -> certify.Certificate:
        """The certified objective of ``genome`` (``ValueError`` without a certifier)."""
        if self.certifier is None:
            raise ValueError("this evaluator has no certified objective (workload key certified)")
        with checked_once():  # the weights hold still for one certificate
            return self.certifier(self.float_model, self.box(genome))

    def __call__(self, genome: Sequence[int]) -> tuple:
        """(accuracy, cost, seconds) of one genome; with a certified objective
        (accuracy, cost, seconds, certified value, certificate status)."""
        t0 = time.perf_counter()
        acc, cost = self.accuracy(genome), self.cost(genome)
        if self.certifier is None:
            return acc, cost, time.perf_counter() - t0
        cert = self.certify(genome)
        return acc, cost, time.perf_counter() - t0, cert.value, cert.status


@dataclass
class Prepared:
    """A workload made ready: evaluator, accuracy floor and the float baseline (None if skipped)."""

    workload: Workload
    model: nn.Sequential
    evaluator: Evaluator
    min_accuracy: float
    baseline: float | None


def calibrate(w: Workload, model: nn.Module) -> fakequant.QuantNet:
    """Calibrate input ranges of ``model`` on the workload's calibration data."""
    Xc, _ = load_data(w.datasets.calibration, limit=w.calibration.samples)
    return fakequant.quantize(
        model,
        Xc,
        conv_only=w.layers == "conv",
        method=w.calibration.method,
        percentile=w.calibration.percentile,
        batch_size=w.batch_size,
    )


def certifier(w: Workload, model: nn.Sequential, input_amax: dict[str, float]):
    """The workload's certified objective (None if it has none), after checking that the model
    can be bounded and that every affine layer is quantised with a calibrated input range;
    raises ``certify.CertifyError`` naming the workload, layer or method otherwise."""
    spec = w.certified
    if spec is None:
        return None
    where = f"workload {w.name!r}, key certified"
    if w.layers != "conv+linear":
        raise certify.CertifyError(
            f"{where}: needs every affine layer quantised (layers: conv+linear, got {w.layers!r}); "
            "an unquantised layer's inputs are not clipped, so no box contains them"
        )
    missing = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear | nn.Conv2d) and n not in input_amax
    ]
    if missing:
        raise certify.CertifyError(f"{where}: no calibrated input range for layers {missing}")
    X, y = load_data(spec.data or w.datasets.exploration, limit=spec.samples)
    try:
        certify.check_certifiable(model, X.shape[1:], spec.method)
    except certify.CertifyError as e:
        raise certify.CertifyError(f"{where}: {e}") from None
    return certify.Certifier(
        X[: spec.samples],
        y[: spec.samples],
        spec.method,
        spec.kind,
        spec.margin,
        spec.dtype,
        spec.stop,
    )


def prepare(
    w: Workload, *, skip_baseline: bool = False, progress: bool = False, threads: int | None = None
) -> Prepared:
    """Load, calibrate and measure the baseline; the accuracy floor follows the constraint."""
    model = load_model(w, progress)
    qnet = calibrate(w, model)
    X, y = load_data(w.datasets.exploration)
    baseline = None
    if skip_baseline or w.constraint.allowed_drop is None:
        if w.constraint.minimum_accuracy is None:
            raise ValueError("the baseline is skipped but the workload gives no minimum_accuracy")
        min_acc = w.constraint.minimum_accuracy
    else:
        baseline = models.evaluate(model, load_data(w.baseline_data))
        min_acc = baseline - w.constraint.allowed_drop
        log.info("baseline accuracy %.4f, minimum accuracy %.4f", baseline, min_acc)
    ev = Evaluator(
        arch=model.arch,
        state_dict={k: v.clone() for k, v in model.state_dict().items()},
        input_amax=qnet.input_amax(),
        conv_only=w.layers == "conv",
        X=X,
        y=y,
        problem=w.problem,
        weighting=w.bit_weighting,
        energy_model=w.energy.model,
        accelerator=w.energy.accelerator,
        mapping=w.energy.mapping,
        batch_size=w.batch_size,
        threads=threads,
        certifier=certifier(w, model, qnet.input_amax()),
    )
    return Prepared(w, model, ev, min_acc, baseline)
