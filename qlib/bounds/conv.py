"""The Conv2d layer of the bounds: ``Affine`` with a convolution and its transpose."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlib.bounds.affine import Affine

__all__ = ["Conv2d"]


class Conv2d(Affine):
    def __init__(self, index: int, module: nn.Conv2d, in_shape: tuple[int, ...]) -> None:
        super().__init__(index, module, in_shape)
        m = module
        # conv_transpose2d cannot tell which input size produced the output: recover the rows and
        # columns that the stride dropped as output padding.
        self.output_padding = tuple(
            in_shape[1 + d]
            - (
                (self.out_shape[1 + d] - 1) * m.stride[d]
                - 2 * m.padding[d]
                + m.dilation[d] * (m.kernel_size[d] - 1)
                + 1
            )
            for d in range(2)
        )

    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        m = self.module
        return F.conv2d(x, weight, None, m.stride, m.padding, m.dilation, m.groups)

    def apply_t(self, A: Tensor, weight: Tensor) -> Tensor:
        m = self.module
        return F.conv_transpose2d(
            A, weight, None, m.stride, m.padding, self.output_padding, m.groups, m.dilation
        )

    def bias_map(self, like: Tensor) -> Tensor:
        return self.bias(like).reshape(-1, 1, 1)

    @property
    def fan_out(self) -> int:
        # An input position meets each kernel offset at most once (fewer with a stride), in
        # every output channel.
        return self.module.out_channels * math.prod(self.module.kernel_size)

    def base_dtype(self, dtype: torch.dtype) -> torch.dtype:
        # A float64 convolution runs up to 18x slower than a float32 one on the CPU (no oneDNN
        # kernel): the base stays in the box's format, with its margin from |W| l.
        return dtype

    def apply_per_sample(self, h: Tensor, W: Tensor, b: Tensor) -> Tensor:
        m, n = self.module, len(h)
        if W.ndim > m.weight.ndim:
            # One grouped convolution runs a different kernel for every sample.
            z = F.conv2d(
                h.reshape(1, -1, *h.shape[2:]),
                W.reshape(-1, *W.shape[2:]),
                None,
                m.stride,
                m.padding,
                m.dilation,
                m.groups * n,
            )
            z = z.reshape(n, -1, *z.shape[2:])
        else:
            z = F.conv2d(h, W, None, m.stride, m.padding, m.dilation, m.groups)
        return z + (b.reshape(n, -1, 1, 1) if b.ndim == 2 else b.reshape(-1, 1, 1))
