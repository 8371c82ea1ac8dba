"""Per-layer perturbations resolved onto the layer objects: one scalar ``Perturbation`` per layer.

``resolve(net, pert)`` turns a uniform ``Perturbation`` or a ``LayerPerturbation`` into a
``Resolved``: the perturbation of the input and one per layer of ``net``, index-aligned with
``bounds.layers(model, in_shape)``. Affine layer ``k`` gets ``Perturbation(eps_weight=...,
eps_bias=...)``, hidden ReLU ``j`` gets ``Clipped(eps_act=..., clip=...)``, a Flatten nothing.
A uniform ``Perturbation`` resolves to itself at every layer, so the rules see the same numbers
either way and a uniform per-layer box gives bit for bit the uniform bounds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qlib.bounds.layers import Affine, Clipped, Layer, ReLU, clip_of
from qlib.quant import LayerPerturbation, Perturbation

__all__ = ["AnyPerturbation", "Clipped", "Resolved", "check_perturbation", "clip_of", "resolve"]

AnyPerturbation = Perturbation | LayerPerturbation


@dataclass(frozen=True)
class Resolved:
    """``input``: the input's perturbation; ``layers[i]``: layer ``i``'s."""

    input: Perturbation
    layers: tuple[Perturbation, ...]


def check_perturbation(pert: object) -> None:
    if not isinstance(pert, Perturbation | LayerPerturbation | Resolved):
        raise TypeError(
            "pert must be a qlib.quant.Perturbation or LayerPerturbation, "
            f"got {type(pert).__name__}"
        )


def resolve(net: Sequence[Layer], pert: AnyPerturbation | Resolved) -> Resolved:
    """One perturbation per layer of ``net`` (idempotent on a ``Resolved`` of the right length).

    Raises ``ValueError`` naming the first layer without radii, or the expected count, when
    the lists of a ``LayerPerturbation`` do not match the network.
    """
    check_perturbation(pert)
    if isinstance(pert, Resolved):
        if len(pert.layers) != len(net):
            raise ValueError(f"resolved perturbation has {len(pert.layers)} layers, net {len(net)}")
        return pert
    if isinstance(pert, Perturbation):
        return Resolved(pert, (pert,) * len(net))
    affine = [layer for layer in net if isinstance(layer, Affine)]
    relus = [layer for layer in net if isinstance(layer, ReLU)]
    for kind, have, layers_ in (
        ("eps_weight", len(pert.eps_weight), affine),
        ("eps_bias", len(pert.eps_bias), affine),
        ("eps_act", len(pert.eps_act), relus),
    ):
        if have != len(layers_):
            extra = f"; no radius for {layers_[have]!r}" if have < len(layers_) else ""
            what = "affine layers" if layers_ is affine else "hidden ReLUs"
            raise ValueError(
                f"LayerPerturbation.{kind} has {have} entries but the network has "
                f"{len(layers_)} {what}{extra}"
            )
    out: list[Perturbation] = []
    k = j = 0
    for layer in net:
        if isinstance(layer, Affine):
            out.append(Perturbation(eps_weight=pert.eps_weight[k], eps_bias=pert.eps_bias[k]))
            k += 1
        elif isinstance(layer, ReLU):
            clip = pert.clip(j)
            eps = pert.eps_act[j]
            out.append(
                Perturbation(eps_act=eps) if clip is None else Clipped(eps_act=eps, clip=clip)
            )
            j += 1
        else:
            out.append(Perturbation())
    inp = (
        Perturbation(eps_input=pert.eps_input)
        if pert.input_clip is None
        else Clipped(eps_input=pert.eps_input, clip=pert.input_clip)
    )
    return Resolved(inp, tuple(out))
