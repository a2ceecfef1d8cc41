"""Every level's module, bound to the parameters of the step being computed.

A level function may reach any module of the program however it likes: as its argument, through
a closure or a global, as an attribute of another object. ``ProgramModules.bound(params)`` points
every learnable parameter slot of every program module at the step's tensors for the duration of
a call, so whatever path the function takes, it reads the live, differentiable values, and the
user's modules hold their own ``nn.Parameter`` objects again afterwards.

A module reached by two paths (``nn.Sequential(lin, nn.Tanh(), lin)``) has one parameter in two
slots: both slots are bound to the same tensor, so its gradient is the sum over both uses.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .graph import ProgramError


def learnable(module: nn.Module) -> dict:
    """``{name: parameter}`` of the module's learnable parameters, one name per parameter (a tied
    parameter under the first path that reaches it, as ``named_parameters()`` names it)."""
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


def _slots(module: nn.Module) -> list:
    """``(owning submodule, attribute, canonical name)`` for every place a learnable parameter of
    ``module`` sits, each place once; a tied parameter has several places and one name."""
    name_of = {id(p): k for k, p in learnable(module).items()}
    slots, seen = [], set()
    for _, sub in module.named_modules(remove_duplicate=False):
        for attr, p in sub._parameters.items():
            if p is not None and id(p) in name_of and (id(sub), attr) not in seen:
                seen.add((id(sub), attr))
                slots.append((sub, attr, name_of[id(p)]))
    return slots


class ProgramModules:
    """The modules of a program's levels, ``{level: module}``, and their binding to parameters."""

    def __init__(self, modules: dict):
        refuse_sharing(modules)
        self.modules = dict(modules)
        self._slots = {lvl: _slots(m) for lvl, m in self.modules.items()}

    def learnable(self, level: str) -> dict:
        return learnable(self.modules[level])

    def parameters(self) -> dict:
        """``{level: {name: parameter}}``: the user's learnable parameters, as they are now."""
        return {lvl: self.learnable(lvl) for lvl in self.modules}

    def owner(self, tensor) -> tuple | None:
        """``(level, name)`` when ``tensor`` is one of the user's learnable parameters, else None."""
        for lvl in self.modules:
            for k, p in self.learnable(lvl).items():
                if p is tensor:
                    return lvl, k
        return None

    @contextlib.contextmanager
    def bound(self, params: dict):
        """Every slot of every level in ``params`` (``{level: {name: tensor}}``) holds that tensor
        while the block runs; the original parameters are put back even if it raises."""
        swaps = [(sub, attr, params[lvl][name]) for lvl, slots in self._slots.items() if lvl in params
                 for sub, attr, name in slots if name in params[lvl]]
        originals = [(sub, attr, sub._parameters[attr]) for sub, attr, _ in swaps]  # all, before any swap
        try:
            for sub, attr, tensor in swaps:
                sub._parameters[attr] = tensor  # what torch.func.functional_call does, for every slot
            yield
        finally:
            for sub, attr, original in reversed(originals):
                sub._parameters[attr] = original


def refuse_sharing(modules: dict):
    """A module or learnable parameter given to two levels would be learned twice, by two optimizers,
    from two copies: refuse it, naming both levels."""
    module_owner, param_owner = {}, {}
    for lvl, module in modules.items():
        other = module_owner.setdefault(id(module), lvl)
        if other != lvl:
            raise ProgramError(
                f"levels '{other}' and '{lvl}' are given the same module ({type(module).__name__}); each "
                f"level learns its own module. Give one of them a copy (copy.deepcopy), or let one level "
                f"learn it and the other read it (name the learning level as an argument)")
        for name, p in module.named_parameters(remove_duplicate=False):
            if not p.requires_grad:
                continue  # a frozen tensor shared by two levels is a constant of both: harmless
            other, other_name = param_owner.setdefault(id(p), (lvl, name))
            if other != lvl:
                raise ProgramError(
                    f"levels '{other}' and '{lvl}' share one nn.Parameter ('{other_name}' of '{other}' is "
                    f"'{name}' of '{lvl}'); a parameter is learned by one level only. Give one level its own "
                    f"copy, or let one level learn it and the other read it through that level's module")


def storage_of(t: torch.Tensor) -> int | None:
    """The address of ``t``'s storage (None for tensors without one: sparse, functional wrappers)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def storages(params: dict) -> set:
    """The storage addresses of ``{level: {name: tensor}}``: a tensor sharing one shares memory with
    a parameter (``.data``, a view of it)."""
    return {storage_of(t) for ps in params.values() for t in ps.values()} - {None}
