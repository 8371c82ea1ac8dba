"""The book's model registry: every trained network a chapter or a workload refers to by name.

``get(name)`` trains the model on first use (seeded, model selection on a 10 % validation
split of the training set) and caches it under ``$QLIB_CACHE``; later calls load the
checkpoint. Names, not code, are what notebooks and workload files refer to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from qlib import data, models
from qlib.quant import Perturbation

__all__ = [
    "CIFAR10_MLP",
    "ROBUST",
    "Recipe",
    "RobustRecipe",
    "get",
    "names",
    "qat",
    "recipe",
    "robust",
]


@dataclass(frozen=True)
class Recipe:
    """How a registered model is built and trained."""

    dataset: str
    arch: dict
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0
    seed: int = 0
    note: str = ""
    tags: tuple[str, ...] = field(default=())


def _mnist_mlp(layers: int, width: int) -> Recipe:
    return Recipe(
        "mnist",
        {"kind": "mlp", "in_shape": [1, 28, 28], "hidden": [width] * (layers - 1), "classes": 10},
        note=f"{layers} linear layers of width {width} (the certification chapter's grid)",
        tags=("certification-grid",),
    )


REGISTRY: dict[str, Recipe] = {
    f"mnist-mlp-{k}x{h}": _mnist_mlp(k, h) for k in (3, 4, 5, 6) for h in (64, 128, 256, 512)
}
REGISTRY |= {
    "mnist-mlp-512-256": Recipe(
        "mnist",
        {"kind": "mlp", "in_shape": [1, 28, 28], "hidden": [512, 256], "classes": 10},
        note="784-512-256-10, the post-training quantisation chapter's MLP",
    ),
    "fashion-mlp": Recipe(
        "fashion-mnist",
        {"kind": "mlp", "in_shape": [1, 28, 28], "hidden": [256, 128, 64, 32, 16], "classes": 10},
        epochs=10,
        note="784-256-128-64-32-16-10, the published F-MNIST MLP",
    ),
    "fashion-cnn": Recipe(
        "fashion-mnist",
        {
            "kind": "cnn",
            "in_shape": [1, 28, 28],
            "channels": [16, 32],
            "hidden": 100,
            "classes": 10,
        },
        epochs=8,
        note="two stride-2 3x3 convolutions (16, 32 channels), 100 hidden units",
    ),
    "digits-mlp": Recipe(
        "digits",
        {"kind": "mlp", "in_shape": [1, 8, 8], "hidden": [32, 32], "classes": 10},
        epochs=60,
        note="64-32-32-10 on 8x8 digits, small enough for exact solvers",
    ),
}


# Models of user-provided data sets are registered only when the data are there, so that the
# chapters that train every registered model keep building without them.
CIFAR10_MLP = Recipe(
    "cifar10",
    {"kind": "mlp", "in_shape": [3, 32, 32], "hidden": [256, 128, 64, 32, 16], "classes": 10},
    epochs=20,
    note="3072-256-128-64-32-16-10, the published CIFAR-10 MLP (CIFAR-10 from $QLIB_DATA_DIR)",
)
if data.available("cifar10"):
    REGISTRY["cifar10-mlp"] = CIFAR10_MLP


def names(tag: str | None = None) -> list[str]:
    """Registered model names (those carrying ``tag`` if given)."""
    return [n for n, r in REGISTRY.items() if tag is None or tag in r.tags]


def recipe(name: str) -> Recipe:
    """The recipe of a registered model; an unknown name lists the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown model {name!r}; registered models: {', '.join(REGISTRY)}"
        ) from None


def get(
    name: str,
    *,
    epochs: int | None = None,
    train_limit: int | None = None,
    progress: bool = True,
) -> nn.Sequential:
    """The trained model ``name`` (from the cache, or trained now and cached).

    ``epochs`` and ``train_limit`` shorten training for quick runs; they are part of the
    cache key, so a quick model never stands in for a full one.
    """
    r = recipe(name)
    X, y = data.load(r.dataset, "train", limit=train_limit)
    train, val = data.train_val_split(X, y, 0.1, seed=r.seed)
    return models.trained(
        name,
        r.arch,
        train,
        val=val,
        seed=r.seed,
        epochs=epochs or r.epochs,
        lr=r.lr,
        batch_size=r.batch_size,
        weight_decay=r.weight_decay,
        progress=progress,
    )


@dataclass(frozen=True)
class RobustRecipe:
    """Certified robust training of a registered architecture (``qlib.robust.train``)."""

    epochs: int = 20
    warmup: int = 2
    ramp: int = 10
    lr: float = 1e-3
    batch_size: int = 128


ROBUST = RobustRecipe()


def robust(
    base: str,
    pert: Perturbation | int,
    *,
    kappa: float = 0.5,
    method: str = "ibp",
    epochs: int | None = None,
    train_limit: int | None = None,
    progress: bool = True,
) -> nn.Sequential:
    """``base``'s architecture trained robustly against ``pert`` (or ``Perturbation.for_bits``).

    Cached like ``get``: the perturbation, kappa, method and schedule are part of the key.
    Model selection uses verified accuracy on the validation split, never the test set.
    """
    from qlib import robust as robust_training

    r = recipe(base)
    if isinstance(pert, int):
        tag, pert = f"{pert}b", Perturbation.for_bits(pert)
    else:
        tag = "custom"
    X, y = data.load(r.dataset, "train", limit=train_limit)
    train, val = data.train_val_split(X, y, 0.1, seed=r.seed)
    settings = {
        "epochs": epochs or ROBUST.epochs,
        "warmup": min(ROBUST.warmup, max(0, (epochs or ROBUST.epochs) - 1)),
        "ramp": ROBUST.ramp if epochs is None else max(1, epochs // 2),
        "lr": ROBUST.lr,
        "batch_size": ROBUST.batch_size,
        "kappa": kappa,
        "method": method,
    }

    def fit(model: nn.Sequential) -> dict:
        result = robust_training.train(
            model, train, pert, val=val, seed=r.seed, progress=progress, **settings
        )
        return {
            "best_epoch": result.best_epoch,
            "val_verified": result.val_verified[result.best_epoch],
            "val_accuracy": result.val_clean[result.best_epoch],
            "val_verified_curve": result.val_verified,
            "val_clean_curve": result.val_clean,
        }

    key = {"n": len(train[0]), "robust": settings, "pert": pert.as_tuple()}
    name = f"robust-{base}-{tag}-k{kappa:g}-{method}"
    return models.cached(name, r.arch, key, fit, seed=r.seed)


def qat(
    base: str,
    bits: int = 8,
    *,
    act_bits: int | None = None,
    kure: float = 0.0,
    epochs: int | None = None,
    train_limit: int | None = None,
    progress: bool = True,
) -> nn.Sequential:
    """``base``'s architecture trained with LSQ quantisation-aware training (``qlib.qat``) at
    ``bits`` weights / ``act_bits`` (default ``bits``) activations, plus KURE when ``kure`` > 0
    (published: 1.0); W8/A8 as published.

    Same data, split, optimiser, epochs and seed as ``get(base)``, so only the training method
    differs. Model selection: fake-quantised validation accuracy. The returned network holds the
    float weights (the LSQ steps dropped, as published). Cached like ``get``.
    """
    from qlib import qat as qat_training

    r = recipe(base)
    X, y = data.load(r.dataset, "train", limit=train_limit)
    train, val = data.train_val_split(X, y, 0.1, seed=r.seed)
    settings = {
        "bits": bits,
        "act_bits": bits if act_bits is None else act_bits,
        "kure": float(kure),
        "epochs": epochs or r.epochs,
        "lr": r.lr,
        "batch_size": r.batch_size,
    }

    def fit(model: nn.Sequential) -> dict:
        result = qat_training.train(
            model, train, val=val, seed=r.seed, progress=progress, **settings
        )
        return {
            "best_epoch": result.best_epoch,
            "val_accuracy_fake_quant": result.val_accuracy[result.best_epoch],
            "val_accuracy_curve": result.val_accuracy,
            "kure_curve": result.kure,
        }

    name = f"qat-{base}-w{settings['bits']}a{settings['act_bits']}-kure{kure:g}"
    key = {"n": len(train[0]), "qat": settings}
    return models.cached(name, r.arch, key, fit, seed=r.seed)
