"""`Hyper`: an nn.Module holding loose named tensors (hyperparameters, data weights, ...)."""
from __future__ import annotations

import torch
from torch import nn


class Hyper(nn.Module):
    """A module whose parameters are the named tensors given, e.g. ``Hyper(log_l2=torch.zeros(20))``.

    Each tensor is copied into an ``nn.Parameter`` and read in a level function as an attribute
    (``outer.log_l2``).
    """

    def __init__(self, **tensors):
        super().__init__()
        if not tensors:
            raise ValueError("Hyper needs at least one named tensor, e.g. Hyper(log_l2=torch.zeros(20))")
        for name, value in tensors.items():
            value = torch.as_tensor(value)
            if not value.is_floating_point():
                value = value.to(torch.get_default_dtype())
            self.register_parameter(name, nn.Parameter(value.detach().clone()))

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: {tuple(p.shape)} {str(p.dtype).removeprefix('torch.')}"
                         for n, p in self.named_parameters())
