"""The networks of the book, their training and evaluation, and cached checkpoints.

Every model is an ``nn.Sequential`` of the operations that ``qlib.bounds`` supports
(Flatten, Linear, Conv2d, ReLU) and carries its architecture description in ``model.arch``
(a plain dict), so that a checkpoint can be rebuilt without code.

Shapes: ``X`` is ``[N, C, H, W]`` float32 in [0, 1], ``y`` is ``[N]`` int64.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

__all__ = [
    "BestEpoch",
    "Data",
    "TrainLog",
    "build",
    "cache_dir",
    "cached",
    "cnn",
    "evaluate",
    "fit",
    "load",
    "mlp",
    "predict",
    "save",
    "train",
    "train_epoch",
    "trained",
]


log = logging.getLogger(__name__)

Data = tuple[Tensor, Tensor]

ARCH_KINDS = ("mlp", "cnn")


def mlp(
    in_shape: Sequence[int], hidden: Sequence[int], classes: int, *, seed: int = 0
) -> nn.Sequential:
    """Flatten, then ``len(hidden) + 1`` Linear layers with ReLU between them.

    "k layers of width h" in the certification chapter is ``mlp(shape, [h] * (k - 1), 10)``.
    """
    arch = {
        "kind": "mlp",
        "in_shape": list(in_shape),
        "hidden": list(hidden),
        "classes": int(classes),
    }
    return build(arch, seed=seed)


def cnn(
    in_shape: Sequence[int],
    classes: int,
    *,
    channels: Sequence[int] = (16, 32),
    hidden: int = 100,
    seed: int = 0,
) -> nn.Sequential:
    """A small CNN: 3x3 stride-2 convolutions with ReLU, then one hidden Linear layer.

    Strided convolutions instead of pooling keep every layer inside what the bound
    propagation, GPFQ and the hardware chapters support.
    """
    arch = {
        "kind": "cnn",
        "in_shape": list(in_shape),
        "channels": list(channels),
        "hidden": int(hidden),
        "classes": int(classes),
    }
    return build(arch, seed=seed)


def build(arch: dict, *, seed: int = 0) -> nn.Sequential:
    """Build the network that ``arch`` describes, with seeded initial weights."""
    _check_arch(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers = _mlp_layers(arch) if arch["kind"] == "mlp" else _cnn_layers(arch)
    model = nn.Sequential(*layers)
    model.arch = dict(arch)
    return model


def _mlp_layers(arch: dict) -> list[nn.Module]:
    c, h, w = arch["in_shape"]
    widths = [c * h * w, *arch["hidden"], arch["classes"]]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return layers


def _cnn_layers(arch: dict) -> list[nn.Module]:
    c, h, w = arch["in_shape"]
    layers: list[nn.Module] = []
    for out_c in arch["channels"]:
        layers += [nn.Conv2d(c, out_c, 3, stride=2, padding=1), nn.ReLU()]
        c, h, w = out_c, (h + 1) // 2, (w + 1) // 2
    layers += [
        nn.Flatten(),
        nn.Linear(c * h * w, arch["hidden"]),
        nn.ReLU(),
        nn.Linear(arch["hidden"], arch["classes"]),
    ]
    return layers


_ARCH_KEYS = {
    "mlp": {"kind", "in_shape", "hidden", "classes"},
    "cnn": {"kind", "in_shape", "channels", "hidden", "classes"},
}


def _check_arch(arch: dict, where: str = "architecture") -> None:
    if not isinstance(arch, dict) or arch.get("kind") not in ARCH_KINDS:
        raise ValueError(f"{where}: 'kind' must be one of {ARCH_KINDS}, got {arch!r}")
    missing = _ARCH_KEYS[arch["kind"]] - set(arch)
    if missing:
        raise ValueError(f"{where}: missing keys {sorted(missing)} for kind {arch['kind']!r}")
    if len(arch["in_shape"]) != 3:
        raise ValueError(f"{where}: 'in_shape' must be [C, H, W], got {arch['in_shape']!r}")


# ----------------------------------------------------------------------------- training


@dataclass
class TrainLog:
    """What ``train`` did: per-epoch training loss and (if given) validation accuracy."""

    loss: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int | None = None


class BestEpoch:
    """Model selection between epochs: keeps the weights of the epoch with the highest score.

    Plain training scores validation accuracy, certified training (verified, clean) accuracy;
    both compare scores with ``>``, so the first of tied epochs wins.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.epoch: int | None = None
        self.score = None
        self._state: dict[str, Tensor] | None = None

    def update(self, epoch: int, score) -> None:
        if self.score is None or score > self.score:
            self.epoch, self.score = epoch, score
            self._state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def restore(self) -> None:
        """Load the kept weights into the model (nothing to do if no epoch was scored)."""
        if self._state is not None:
            self.model.load_state_dict(self._state)


def train(
    model: nn.Module,
    data: Data,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    val: Data | None = None,
    seed: int = 0,
    progress: bool = True,
) -> TrainLog:
    """Train ``model`` in place with Adam and cross-entropy.

    With ``val`` given, the weights of the epoch with the best validation accuracy are kept
    (model selection on a validation split, never on the test set).
    """
    X, y = _check_data(data, "data")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    result = TrainLog()

    def validate() -> tuple[float, dict[str, str]]:
        acc = evaluate(model, val)
        result.val_accuracy.append(acc)
        return acc, {"val": f"{acc:.3f}"}

    result.loss, result.best_epoch = fit(
        model,
        (X, y),
        opt,
        lambda xb, yb: nn.functional.cross_entropy(model(xb), yb),
        epochs=epochs,
        gen=gen,
        batch_size=batch_size,
        sched=sched,
        validate=None if val is None else validate,
        desc="train",
        progress=progress,
    )
    model.eval()
    return result


def fit(
    model: nn.Module,
    data: Data,
    opt: torch.optim.Optimizer,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    epochs: int,
    gen: torch.Generator,
    batch_size: int,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
    validate: Callable[[], tuple[object, dict[str, str]]] | None = None,
    after_epoch: Callable[[], None] | None = None,
    keep: nn.Module | None = None,
    desc: str = "train",
    progress: bool = True,
) -> tuple[list[float], int | None]:
    """The one epoch loop of ``qlib``: ``train_epoch``, then ``after_epoch()``, the scheduler's
    step, and ``validate() -> (score, shown)``, whose best score (``BestEpoch``) decides which
    epoch's weights of ``keep`` (default ``model``) are restored at the end. Returns the epoch
    losses and the kept epoch (None without ``validate``). Plain, certified and
    quantisation-aware training differ only in their loss and their callbacks."""
    best = BestEpoch(model if keep is None else keep)
    losses: list[float] = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        losses.append(train_epoch(model, data, opt, gen, batch_size, loss_fn))
        if after_epoch is not None:
            after_epoch()
        if sched is not None:
            sched.step()
        shown = {"loss": f"{losses[-1]:.3f}"}
        if validate is not None:
            score, extra = validate()
            best.update(epoch, score)
            shown |= extra
        bar.set_postfix(**shown)
    best.restore()
    return losses, best.epoch


def train_epoch(
    model: nn.Module,
    data: Data,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    batch_size: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> float:
    """One epoch of minibatch steps in a seeded random order; the mean of ``loss_fn(X_b, y_b)``.

    The one training loop of ``qlib``: plain training and certified robust training differ
    only in ``loss_fn`` and in what they do between epochs.
    """
    X, y = data
    model.train()
    order = torch.randperm(len(X), generator=gen)
    total = 0.0
    for start in range(0, len(X), batch_size):
        idx = order[start : start + batch_size]
        loss = loss_fn(X[idx], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(X)


@torch.no_grad()
def predict(model: nn.Module, X: Tensor, batch_size: int = 2048) -> Tensor:
    """Logits ``[N, classes]`` of ``model`` in eval mode."""
    model.eval()
    return torch.cat([model(X[i : i + batch_size]) for i in range(0, len(X), batch_size)])


def evaluate(model: nn.Module, data: Data, batch_size: int = 2048) -> float:
    """Top-1 accuracy of ``model`` on ``data``: the one way ``qlib`` measures accuracy."""
    X, y = _check_data(data, "data")
    return (predict(model, X, batch_size).argmax(1) == y).float().mean().item()


def _check_data(data: Data, name: str) -> Data:
    try:
        X, y = data
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a pair (X, y) of tensors") from None
    if X.ndim != 4 or y.ndim != 1 or len(X) != len(y) or len(X) == 0:
        raise ValueError(
            f"{name}: expected X [N, C, H, W] and y [N] with N > 0, got {tuple(X.shape)} and {tuple(y.shape)}"
        )
    return X, y


# ----------------------------------------------------------------------------- checkpoints


def save(model: nn.Module, path: str | os.PathLike, meta: dict | None = None) -> Path:
    """Save ``model``'s state dict with its architecture (and optional metadata)."""
    if not hasattr(model, "arch"):
        raise ValueError("model has no 'arch' description: build it with qlib.models.mlp/cnn/build")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"arch": model.arch, "state_dict": model.state_dict(), "meta": meta or {}}, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a half-written checkpoint
    return path


def load(path: str | os.PathLike, arch: dict | None = None) -> nn.Sequential:
    """Load a checkpoint written by ``save``; if ``arch`` is given it must match the file's."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is not a readable torch checkpoint: {e}") from e
    if not isinstance(ckpt, dict) or not {"arch", "state_dict"} <= set(ckpt):
        raise ValueError(f"checkpoint {path}: expected a dict with 'arch' and 'state_dict'")
    _check_arch(ckpt["arch"], where=f"checkpoint {path}")
    if arch is not None and dict(arch) != dict(ckpt["arch"]):
        raise ValueError(f"checkpoint {path} holds architecture {ckpt['arch']}, expected {arch}")
    model = build(ckpt["arch"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise ValueError(
            f"checkpoint {path}: weights do not match architecture {ckpt['arch']}: {e}"
        ) from e
    model.meta = ckpt.get("meta", {})
    return model.eval()


def cache_dir() -> Path:
    """Directory of cached checkpoints: ``$QLIB_CACHE`` or ``.qlib-cache/``."""
    return Path(os.environ.get("QLIB_CACHE", ".qlib-cache"))


def cached(
    name: str, arch: dict, key: dict, fit: Callable[[nn.Sequential], dict], *, seed: int = 0
) -> nn.Sequential:
    """The model ``name`` built from ``arch`` and trained by ``fit``, cached under ``cache_dir()``.

    ``key`` describes everything that determines the trained weights besides ``arch`` and
    ``seed`` (data size, training arguments); any change trains a new model instead of reusing a
    stale one. ``fit`` trains the freshly built model in place and returns metadata to store.
    """
    text = json.dumps({"arch": arch, "seed": seed, **key}, sort_keys=True, default=str)
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    path = cache_dir() / f"{name}-{digest}.pt"
    if path.is_file():
        log.info("loading cached model %s", path)
        return load(path, arch)
    model = build(arch, seed=seed)
    meta = {"name": name, "key": text, **(fit(model) or {})}
    save(model, path, meta)
    model.meta = meta
    return model.eval()


def trained(
    name: str,
    arch: dict,
    data: Data,
    *,
    val: Data | None = None,
    seed: int = 0,
    progress: bool = True,
    **train_kwargs,
) -> nn.Sequential:
    """A model trained with ``train`` on ``data`` (from the cache, or trained now and cached)."""

    def fit(model: nn.Sequential) -> dict:
        result = train(model, data, val=val, seed=seed, progress=progress, **train_kwargs)
        meta = {"best_epoch": result.best_epoch}
        if val is not None:
            meta["val_accuracy"] = max(result.val_accuracy)
        return meta

    return cached(name, arch, {"n": len(data[0]), "train": train_kwargs}, fit, seed=seed)
