"""Python values a level's traced graph holds as constants, watched between steps.

Tracing runs a level's function once, so every Python value it reads on the way (a global, a
closure variable, an item of a config dict, an attribute of an ``argparse`` namespace, of a module
such as ``net.tau`` or ``Dropout.p``) is frozen into the graph. Changing it after the build (a
temperature schedule, an annealed coefficient) would leave the step computing with the old value,
silently. So the build notes every such value the function can reach (``collect``): the globals
and closure variables its code names, and those of the user functions it calls, shallowly
expanded through dicts and plain objects; and the attributes of modules read while it was traced
(``recording_module_reads``). Before every step (``Baked.check``) they are compared with what the
graph was traced with. A changed one retraces the levels that can see it: where a new graph
differs from the step's, the step is refused before anything moves, naming the value and how to
make it one the step reads; where no graph differs (the function does not use that value), the
step goes on.

Tensors are not frozen by value (the graph keeps the tensor object, so an in-place ``fill_`` is
seen); rebinding a name to another tensor is a change like any other.
"""
from __future__ import annotations

import contextlib
import enum
import os
import sys
import types
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from .graph import ProgramError

_MISSING = object()
_SCALARS = (bool, int, float, complex, str, bytes, type(None))
_MAX_ITEMS = 256  # a dict or object with more entries is a data structure, not a configuration
_RETRACES_BEFORE_WARNING = 8


def _by_value(value) -> bool:
    """Compared by value: numbers, strings, dtypes, devices, shapes and short tuples of them; anything
    else (a tensor, a dict, a function) by identity, since the graph holds the object itself or
    what it held when traced."""
    if isinstance(value, _SCALARS + (torch.dtype, torch.device, enum.Enum)):
        return True
    return isinstance(value, (tuple, list)) and len(value) <= 64 and all(_by_value(x) for x in value)


def _snapshot(value):
    return tuple(value) if isinstance(value, list) and _by_value(value) else value


def _same(now, then) -> bool:
    if now is then:
        return True
    if not _by_value(then) or not _by_value(now):
        return False
    return type(_snapshot(now)) is type(then) and bool(_snapshot(now) == then)


@dataclass
class Watched:
    """One Python value a level's function reads: ``where`` says how (``cfg['temp']``, ``net.tau``)."""

    where: str
    read: Callable[[], object]
    value: object
    levels: set = field(default_factory=set)


def _user_function(fn) -> bool:
    """A Python function of the user's own code (not torch's, the standard library's, mlodsl's or an
    installed package's): its globals are the user's too."""
    if not isinstance(fn, types.FunctionType):
        return False
    path = fn.__code__.co_filename
    if path.startswith("<"):  # a notebook cell, exec'd code
        return not path.startswith("<mlodsl")
    path = os.path.abspath(path)
    package = os.path.dirname(os.path.abspath(__file__))
    library = [os.path.dirname(os.__file__)] + [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    return not path.startswith(package + os.sep) and not any(path.startswith(p + os.sep) for p in library)


def _names_in(code: types.CodeType) -> set:
    """Every global name ``code`` and the code nested in it (lambdas, comprehensions) may load."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names_in(const)
    return names


def _item(container, key):
    return container.get(key, _MISSING) if isinstance(container, dict) else _MISSING


class _Collector:
    def __init__(self, level: str):
        self.level = level
        self.entries: dict = {}  # where it is held -> Watched

    def add(self, key, where: str, read: Callable, value) -> None:
        entry = self.entries.setdefault(key, Watched(where, read, _snapshot(value)))
        entry.levels.add(self.level)

    def value(self, key, where: str, read: Callable, value, depth: int, seen: set) -> None:
        """``value``, read now by ``read()`` as ``where``; and what it holds when it is a dict, a plain
        object or a user function, read through ``read`` (a rebound dict is read, not the old one)."""
        self.add(key, where, read, value)
        if id(value) in seen or depth > 3:
            return
        seen.add(id(value))
        if _user_function(value):
            self.function(value, depth + 1, seen)
        elif isinstance(value, dict) and len(value) <= _MAX_ITEMS:
            for k, v in list(value.items()):
                self.add((key, repr(k)), f"{where}[{k!r}]", lambda r=read, k=k: _item(r(), k), v)
        elif _plain_object(value) and len(vars(value)) <= _MAX_ITEMS:
            for name, v in list(vars(value).items()):
                if not name.startswith("_"):
                    self.add((key, name), f"{where}.{name}", lambda r=read, n=name: getattr(r(), n, _MISSING), v)

    def function(self, fn, depth: int = 0, seen: set | None = None) -> None:
        """The closure variables and the globals ``fn``'s code names (a name never loaded as a global,
        an attribute's, only costs a comparison)."""
        seen = set() if seen is None else seen
        code = fn.__code__
        for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:  # not yet bound
                continue
            self.value((id(cell),), name, lambda c=cell: c.cell_contents, value, depth, seen)
        scope = fn.__globals__
        for name in _names_in(code):
            if name in scope:
                self.value((id(scope), name), name, lambda g=scope, n=name: g.get(n, _MISSING), scope[name],
                           depth, seen)


def _plain_object(value) -> bool:
    """An object whose attributes are settings (an ``argparse.Namespace``, a config dataclass, a
    Hugging Face config): not a module, tensor, class, function or Python module."""
    return (hasattr(value, "__dict__") and not isinstance(value, (nn.Module, torch.Tensor, type, types.ModuleType,
                                                                  types.FunctionType, types.MethodType))
            and not callable(value))


@contextlib.contextmanager
def recording_module_reads():
    """Records ``(module, attribute)`` for every attribute found on a module's instance or class while
    active (``self.p`` in ``Dropout.forward``, ``net.tau`` in a level function); parameters, buffers
    and submodules are found by ``nn.Module.__getattr__`` and are not recorded, nor private names
    or ``training`` (which the program sets)."""
    reads: dict = {}

    def getattribute(self, name):
        value = object.__getattribute__(self, name)
        if name[0] != "_" and name != "training":
            reads[(id(self), name)] = (self, name)
        return value

    before = nn.Module.__dict__.get("__getattribute__")
    nn.Module.__getattribute__ = getattribute
    try:
        yield reads
    finally:
        if before is None:
            del nn.Module.__getattribute__
        else:
            nn.Module.__getattribute__ = before


def collect(level: str, fn: Callable, module_reads: dict, module_names: dict) -> dict:
    """The values level ``level``'s function ``fn`` can have frozen into its graph, keyed by where they
    are held: from its code (``_Collector.function``) and the module attributes read while it was
    traced (``module_reads``, named by ``module_names``: ``{id(module): 'net.0'}``)."""
    collector = _Collector(level)
    collector.function(fn)
    seen: set = set()  # one config object that every layer holds is expanded once
    for module, name in module_reads.values():
        if hasattr(nn.Module, name) or isinstance(getattr(type(module), name, None), property):
            continue  # torch's own (call_super_init), or computed from attributes that are recorded too
        value = getattr(module, name, _MISSING)
        if isinstance(value, (types.MethodType, types.FunctionType)) or value is _MISSING:
            continue  # a bound method is a new object at every read
        where = f"{module_names.get(id(module), type(module).__name__)}.{name}"
        collector.value((id(module), name), where, lambda m=module, n=name: getattr(m, n, _MISSING), value, 1, seen)
    return collector.entries


def fingerprint(gm) -> tuple:
    """What makes two traces of one function the same graph: its code and its tensor constants."""
    constants = []
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            obj = gm
            for part in node.target.split("."):
                obj = getattr(obj, part, None)
            constants.append(obj)
    return gm.code, constants


def same_graph(a: tuple, b: tuple) -> bool:
    (code_a, consts_a), (code_b, consts_b) = a, b
    if code_a != code_b or len(consts_a) != len(consts_b):
        return False
    for x, y in zip(consts_a, consts_b):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x is not y and (x.dtype != y.dtype or x.shape != y.shape or x.device != y.device
                               or not torch.equal(x, y)):
                return False
        elif x is not y and not _same(y, x):
            return False
    return True


class Baked:
    """Every level's watched values, and how to retrace a level: ``retrace[level]()`` gives the
    fingerprint of a new trace, ``traced[level]`` that of the graph the step runs."""

    def __init__(self, entries: list, traced: dict, retrace: dict):
        self.entries, self.traced, self.retrace = entries, traced, retrace
        self.retraces = 0

    @classmethod
    def of(cls, levels: dict) -> Baked:
        """From the traced levels (``TracedLevel.baked``, ``.fingerprint``, ``.retrace``): opaque
        levels call their function live and need no watch."""
        merged: dict = {}
        for traced in levels.values():
            if traced.retrace is None:
                continue
            for key, entry in traced.baked.items():
                if key in merged:
                    merged[key].levels |= entry.levels
                else:
                    merged[key] = entry
        watched = {n: t for n, t in levels.items() if t.retrace is not None}
        return cls(list(merged.values()), {n: t.fingerprint for n, t in watched.items()},
                   {n: t.retrace for n, t in watched.items()})

    def check(self) -> None:
        """Refuse (``ProgramError``) when a value a graph froze has changed in a way that changes the
        graph; take note of a change that does not. Nothing else is touched."""
        changed = []
        for e in self.entries:  # the usual case inline: the same object as at the build
            try:
                now = e.read()
            except Exception:  # noqa: BLE001 - an attribute deleted, a key removed: a change
                changed.append(e)
                continue
            if now is not e.value and not _same(now, e.value):
                changed.append(e)
        if not changed:
            return
        levels = sorted(set().union(*(e.levels for e in changed)))
        for name in levels:
            self.retraces += 1
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    same = same_graph(self.retrace[name](), self.traced[name])
            except ProgramError:
                raise
            except Exception:  # noqa: BLE001 - a function that no longer traces has changed too
                same = False
            if not same:
                raise ProgramError(_message(name, [e for e in changed if name in e.levels]))
        for e in changed:  # read by no graph: go on, comparing with the new value from now on
            now = e.read()
            e.value = _snapshot(now)
        if self.retraces == _RETRACES_BEFORE_WARNING:
            warnings.warn(
                f"{', '.join(e.where for e in changed)} keep changing between steps; each change retraces "
                f"level(s) {levels} to check that the graph does not use them ({self.retraces} retraces so "
                f"far). Keep such values out of the level functions' reach to skip the retraces.",
                RuntimeWarning, stacklevel=3)


def _message(level: str, changed: list) -> str:
    def shown(value):
        if value is _MISSING:
            return "gone"
        return f"tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)

    def now(entry):
        try:
            return entry.read()
        except Exception:  # noqa: BLE001 - deleted
            return _MISSING

    what = "; ".join(f"{e.where} ({shown(e.value)} when traced, {shown(now(e))} now)" for e in changed)
    return (f"level '{level}' reads Python values that changed since the Program was built: {what} (modules "
            f"are named by level and path: `inner.0.p` is attribute `p` of level 'inner''s module's `[0]`). "
            f"Tracing froze the old value into the level's graph, so this step would silently compute with it; "
            f"the step is refused and nothing has changed. Hold a value you change between steps in a "
            f"tensor the function reads, and change that tensor in place (`tau = torch.tensor(1.0)`, then "
            f"`tau.fill_(0.5)`; or `net.register_buffer('tau', torch.tensor(1.0))`, then "
            f"`net.tau.fill_(0.5)`), or build the Program again after changing it.")
