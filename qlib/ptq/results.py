"""What a PTQ run returns: per-layer codes and scales, the quantised model, the export and the log."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from torch import Tensor, nn

__all__ = ["LOG_COLUMNS", "LayerResult", "QuantizedModel", "append_log", "model_name"]

LOG_COLUMNS = (
    "time_utc",
    "model",
    "method",
    "bits",
    "levels",
    "per_channel",
    "scalar",
    "calib_size",
    "p",
    "seed",
    "accuracy",
    "float_accuracy",
    "time_s",
)


@dataclass(frozen=True, eq=False)
class LayerResult:
    """One quantised layer: ``weight = codes * scale``; codes lie in ``[min_int, max_int]``.

    ``codes`` int32 with the weight's shape (``[out, in]`` or ``[out, C_in, kh, kw]``);
    ``scale`` float32, ``[]`` per layer or ``[out, 1, ...]`` per channel; ``scalar`` is the C
    used; ``rel_error`` is ``||XW^T - X~Q^T||^2 / ||XW^T||^2`` on the calibration set (nan
    without one); ``bias`` the layer's (possibly corrected) float bias.
    """

    name: str
    codes: Tensor
    scale: Tensor
    bits: int
    levels: str
    min_int: int
    max_int: int
    scalar: float
    rel_error: float
    bias: Tensor | None = None

    @property
    def num_levels(self) -> int:
        return self.max_int - self.min_int + 1

    def weight(self) -> Tensor:
        """The dequantised weight (float32, the layer's weight shape)."""
        return self.codes.float() * self.scale


@dataclass
class QuantizedModel:
    """A quantised copy of a model, its per-layer codes and scales, and the run's settings."""

    model: nn.Module
    layers: list[LayerResult]
    method: str
    config: dict
    calib_size: int
    time_s: float
    accuracy: float | None = None
    float_accuracy: float | None = None
    float_layers: list[str] = field(default_factory=list)

    def layer(self, name: str) -> LayerResult:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(f"no quantised layer named {name!r}; have {[r.name for r in self.layers]}")

    def export(self) -> dict[str, dict]:
        """Integer codes and scales per layer, ready for ``torch.save``."""
        return {
            r.name: {
                "codes": r.codes,
                "scale": r.scale,
                "bits": r.bits,
                "levels": r.levels,
                "min_int": r.min_int,
                "max_int": r.max_int,
                "bias": r.bias,
            }
            for r in self.layers
        }

    def log_row(self, model_name: str) -> dict:
        """One row of the run log (columns ``LOG_COLUMNS``)."""
        c = self.config
        return {
            "time_utc": datetime.now(UTC).isoformat(timespec="seconds"),
            "model": model_name,
            "method": self.method,
            "bits": "/".join(str(r.bits) for r in self.layers),
            "levels": c.get("levels"),
            "per_channel": c.get("per_channel"),
            "scalar": "/".join(f"{r.scalar:.4g}" for r in self.layers),
            "calib_size": self.calib_size,
            "p": c.get("p", 1.0),
            "seed": c.get("seed", 0),
            "accuracy": "" if self.accuracy is None else f"{self.accuracy:.6f}",
            "float_accuracy": "" if self.float_accuracy is None else f"{self.float_accuracy:.6f}",
            "time_s": f"{self.time_s:.3f}",
        }


def append_log(row: Mapping, path: str | os.PathLike) -> None:
    """Append ``row`` to the CSV at ``path``, writing the header when the file is new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in LOG_COLUMNS})


def model_name(model: nn.Module) -> str:
    """A short name for logs: the architecture description if the model has one."""
    arch = getattr(model, "arch", None)
    if isinstance(arch, dict):
        parts = [arch.get("kind", "?")] + [
            f"{k}={v}" for k, v in arch.items() if k != "kind" and k != "in_shape"
        ]
        return " ".join(str(p) for p in parts)
    return type(model).__name__
