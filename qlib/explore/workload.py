"""Workload files: the YAML description of one mixed-precision exploration, validated with pydantic.

``load(path) -> Workload``; every error names its key path and the file, e.g.
``workloads/x.yaml: nsga2.population: Input should be greater than or equal to 2``.
A workload names its model (a ``qlib.zoo`` name, optionally a checkpoint) and never holds code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from qlib import data, zoo

__all__ = [
    "BitsSpec",
    "CalibrationSpec",
    "CertifiedSpec",
    "ConstraintSpec",
    "DatasetSpec",
    "Datasets",
    "EnergySpec",
    "MAX_BITS",
    "MIN_BITS",
    "ModelSpec",
    "NSGA2Spec",
    "PROBLEMS",
    "ParallelSpec",
    "RetrainingSpec",
    "WEATHER_CONDITIONS",
    "WeatherSpec",
    "Workload",
    "WorkloadError",
    "certificate_code",
    "load",
    "override",
    "parse",
]


PROBLEMS = ("quantization_problem", "energy_aware_quant_problem")
WEATHER_CONDITIONS = ("rain", "fog", "snow", "brightness")
# Lower limit 2: with 1 bit the symmetric quantiser's largest level is 2**0 - 1 = 0 and the
# scale becomes 0 / amax, so every output is NaN.
MIN_BITS, MAX_BITS = 2, 16


class WorkloadError(ValueError):
    """A workload file that cannot be used; the message lists every problem with its key path."""


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """A registered model; ``checkpoint`` (a ``qlib.models.save`` file) replaces its weights."""

    name: str
    checkpoint: Path | None = None
    epochs: int | None = Field(default=None, ge=1)
    train_limit: int | None = Field(default=None, ge=1)

    @field_validator("name")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in zoo.REGISTRY:
            raise ValueError(f"unknown model {v!r}; registered: {', '.join(zoo.REGISTRY)}")
        return v


class WeatherSpec(_Strict):
    """A synthetic weather corruption applied to a data set (see ``qlib.explore.weather``)."""

    condition: Literal["rain", "fog", "snow", "brightness"]
    severity: int = Field(ge=1, le=5)
    seed: int = 0


class DatasetSpec(_Strict):
    """``limit`` samples of ``split`` of ``dataset``, starting at ``offset``, optionally corrupted."""

    dataset: str
    split: Literal["train", "test"] = "test"
    limit: int | None = Field(default=None, ge=1)
    offset: int = Field(default=0, ge=0)
    weather: WeatherSpec | None = None

    @field_validator("dataset")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in data.DATASETS:
            raise ValueError(f"unknown data set {v!r}; expected one of {', '.join(data.DATASETS)}")
        return v


class Datasets(_Strict):
    """Which data each step reads; ``baseline`` and ``reevaluation`` default to ``exploration``."""

    exploration: DatasetSpec
    calibration: DatasetSpec
    baseline: DatasetSpec | None = None
    reevaluation: DatasetSpec | None = None
    train: DatasetSpec | None = None


class CalibrationSpec(_Strict):
    """Input ranges: running ``max`` or the ``percentile`` of a histogram (99.99 in the paper)."""

    method: Literal["max", "percentile"] = "percentile"
    percentile: float = Field(default=99.99, gt=0, le=100)
    samples: int = Field(default=512, ge=1)


class NSGA2Spec(_Strict):
    """NSGA-II with SBX crossover and polynomial mutation on integer genes."""

    population: int = Field(ge=2)
    offspring: int = Field(ge=1)
    generations: int = Field(ge=1)
    crossover_eta: float = Field(default=15.0, gt=0)
    crossover_prob: float = Field(default=0.9, ge=0, le=1)
    mutation_eta: float = Field(default=20.0, gt=0)
    mutation_prob: float = Field(default=0.9, ge=0, le=1)
    seed: int = 1


class BitsSpec(_Strict):
    """Limits of every gene (bits of one input or weight quantiser)."""

    lower: int = Field(ge=MIN_BITS, le=MAX_BITS)
    upper: int = Field(ge=MIN_BITS, le=MAX_BITS)

    @model_validator(mode="after")
    def _ordered(self) -> BitsSpec:
        if self.lower > self.upper:
            raise ValueError(f"lower ({self.lower}) must be <= upper ({self.upper})")
        return self


class ConstraintSpec(_Strict):
    """Accuracy floor: ``minimum_accuracy`` or ``allowed_drop`` below the measured baseline.

    With both given, ``allowed_drop`` is used unless the baseline is skipped.
    """

    minimum_accuracy: float | None = Field(default=None, ge=0, le=1)
    allowed_drop: float | None = Field(default=None, ge=0, le=1)

    @model_validator(mode="after")
    def _one(self) -> ConstraintSpec:
        if self.minimum_accuracy is None and self.allowed_drop is None:
            raise ValueError("give minimum_accuracy or allowed_drop")
        return self


class EnergySpec(_Strict):
    """DRAM-traffic model: ``zigzag`` per layer and precision, or the paper's ``linear`` scaling."""

    model: Literal["zigzag", "linear"] = "linear"
    accelerator: str = "eyeriss_like"
    mapping: str = "default"


class RetrainingSpec(_Strict):
    """Short quantisation-aware fine-tuning (straight-through estimator) of the best individuals."""

    epochs: int = Field(default=2, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    batch_size: int = Field(default=128, ge=1)


class CertifiedSpec(_Strict):
    """A third objective: what the genome's per-layer box certifies (``qlib.explore.certify``).

    ``kind``: ``discrepancy`` (the mean certified worst-case discrepancy on the true-class
    probability, minimised) or ``accuracy`` (the certified accuracy, logit margins above
    ``margin``, maximised); over ``data`` (default: the first ``samples`` exploration images),
    bounded with ``method`` (a name of ``qlib.bounds.available_methods()``) in ``dtype``
    (float32 bounds are as rigorous, about twice as fast and slightly looser). ``stop``
    (``crown-ibp`` only): the logits are back-substituted to the input of that affine layer,
    whose IBP interval finishes the bound; 1 skips the widest, first layer
    (``qlib.bounds.CrownIbpOptions``).
    """

    kind: Literal["discrepancy", "accuracy"] = "discrepancy"
    method: str = "crown-ibp"
    samples: int = Field(default=64, ge=1)
    margin: float = Field(default=0.0, ge=0)
    data: DatasetSpec | None = None
    dtype: Literal["float64", "float32"] = "float64"
    stop: int = 0

    @field_validator("method")
    @classmethod
    def _method(cls, v: str) -> str:
        from qlib import bounds

        if v not in bounds.available_methods():
            raise ValueError(
                f"unknown bound method {v!r}; expected one of {', '.join(bounds.available_methods())}"
            )
        return v

    @model_validator(mode="after")
    def _stop(self) -> CertifiedSpec:
        if self.stop and self.method != "crown-ibp":
            raise ValueError(f"stop applies to method crown-ibp only, got method {self.method!r}")
        return self


class ParallelSpec(_Strict):
    """Where evaluations run: ``serial``, a ``local`` Dask cluster, or a scheduler ``address``."""

    mode: Literal["serial", "local", "address"] = "local"
    workers: int = Field(default=2, ge=1)
    address: str | None = None

    @model_validator(mode="after")
    def _address(self) -> ParallelSpec:
        if self.mode == "address" and not self.address:
            raise ValueError("mode 'address' needs an address (e.g. tcp://host:8786)")
        return self


class Workload(_Strict):
    """One exploration, as written in a workload YAML file."""

    problem: Literal["quantization_problem", "energy_aware_quant_problem"]
    model: ModelSpec
    datasets: Datasets
    calibration: CalibrationSpec = CalibrationSpec()
    nsga2: NSGA2Spec
    bits: BitsSpec
    bit_weighting: Literal["sum", "published"] = "sum"
    constraint: ConstraintSpec
    energy: EnergySpec = EnergySpec()
    retraining: RetrainingSpec = RetrainingSpec()
    layers: Literal["conv", "conv+linear"] = "conv+linear"
    batch_size: int = Field(default=1024, ge=1)
    parallel: ParallelSpec = ParallelSpec()
    certified: CertifiedSpec | None = None
    name: str = ""

    def digest(self) -> str:
        """Hash of everything that decides an individual's evaluation (not NSGA-II or parallel
        settings), so a results file can be resumed or extended only by the same evaluations."""
        keep = self.model_dump(
            mode="json",
            exclude={"nsga2", "parallel", "retraining", "name", "batch_size", "certified"},
        )
        if self.certified is not None:  # absent from older digests, which stay valid
            keep["certified"] = self.certified.model_dump(mode="json")
            if not self.certified.stop:  # added later: the default keeps older digests valid
                del keep["certified"]["stop"]
            # A certificate is only as good as the code that computed it: a fix to the bounds
            # must not leave older values in a results file that a rerun resumes.
            keep["certificate_code"] = certificate_code()
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]

    @property
    def baseline_data(self) -> DatasetSpec:
        return self.datasets.baseline or self.datasets.exploration


def certificate_code() -> str:
    """Hash of the source that computes a certified objective (``qlib.bounds``, the genome box
    of ``qlib.explore.certify`` and the quantisers it models); part of a certified workload's
    digest."""
    root = Path(__file__).resolve().parents[1]
    files = sorted((root / "bounds").glob("*.py")) + [
        root / "explore" / "certify.py",
        root / "quant.py",
    ]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def parse(raw: object, source: str = "<workload>") -> Workload:
    """Validate a mapping (already read from YAML); errors become one ``WorkloadError``."""
    if isinstance(raw, dict) and set(raw) == {"workload"}:
        raw = raw["workload"]  # the reference repository nests everything under 'workload:'
    if not isinstance(raw, dict):
        raise WorkloadError(
            f"{source}: expected a mapping at the top level, got {type(raw).__name__}"
        )
    try:
        return Workload.model_validate(raw)
    except ValidationError as e:
        raise WorkloadError(
            f"{source}:\n" + "\n".join(_format(err) for err in e.errors())
        ) from None


def load(path: str | os.PathLike) -> Workload:
    """Read and validate a workload YAML file; the file's stem becomes the default ``name``."""
    path = Path(path)
    if not path.is_file():
        raise WorkloadError(f"{path}: workload file does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise WorkloadError(f"{path}: not valid YAML: {e}") from None
    w = parse(raw, str(path))
    return w if w.name else w.model_copy(update={"name": path.stem})


def override(w: Workload, changes: dict) -> Workload:
    """``w`` with the nested fields of ``changes`` replaced (``{"nsga2": {"population": 8}}``),
    validated again, so an override that breaks the schema names its key like a file would."""

    def merge(a: dict, b: dict) -> dict:
        return {
            k: merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
            for k, v in (a | b).items()
        }

    return parse(merge(w.model_dump(mode="json"), changes), f"{w.name} (overridden)")


def _format(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "<top>"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "missing":
        msg = "required key is missing"
    elif err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"  {loc}: {msg}"
