"""`@level`: a level of a multilevel program, written as a plain function.

Binding rules of a level function ``fn(own, batch, other, ...)``:

* the first parameter receives the level's own module, called with its current parameters;
* a parameter named ``batch`` receives the level's current batch;
* every other parameter without a default names another level and receives that level's module;
* a parameter with a default keeps it (``def inner(net, batch, outer, i=i)`` for levels made in a loop).
"""
from __future__ import annotations

import inspect
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .optim import as_optimizer


@dataclass(eq=False)
class Level:
    """A level: the function, the module it learns, how it learns it, and what it depends on."""

    fn: Callable
    module: nn.Module
    optimizer: Any
    data: Any = None
    depends_on: tuple = ()
    steps: int = 1
    hypergrad: Any = None
    start_from: Any = None
    tasks: bool = False
    project: Any = None
    read_mode: str = "train"
    precision: str | None = None            # None: the Program's
    clip_grad_norm: float | None = None
    batch_per: str = "update"               # "block": one batch for all `steps` updates of a block
    shard: bool = False                     # keep a 1/world slice per rank (mlodsl.sharding)
    name: str = ""
    own_arg: str = ""                       # the name of fn's first parameter
    level_args: tuple = ()                  # the other parameters (names of levels)
    takes_batch: bool = False

    def __post_init__(self):
        _DEFINED.add(self)

    def __repr__(self) -> str:
        deps = [d if isinstance(d, str) else d.name for d in self.depends_on]
        return (f"Level({self.name!r}, module={type(self.module).__name__}, optimizer={self.optimizer!r}, "
                f"steps={self.steps}, depends_on={deps}, hypergrad={self.hypergrad!r})")

    @property
    def depends_on_names(self) -> tuple:
        return tuple(d if isinstance(d, str) else d.name for d in self.depends_on)


# Every level created and still alive, so that a name that resolves to no level of a program can be
# checked against all the levels the user defined (a misspelling, or a level left out of the program).
_DEFINED: "weakref.WeakSet[Level]" = weakref.WeakSet()


def defined_names() -> set:
    """The names of the levels defined so far and still alive."""
    return {lvl.name for lvl in list(_DEFINED)}


def _check_optimizer(name, optimizer):
    if optimizer is None or not (callable(getattr(optimizer, "init", None))
                                 and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"level '{name}': optimizer must have init(params) and update(params, grads, state, reads), "
                        f"e.g. ml.optim.sgd(lr=0.1); got {optimizer!r}")


def _check_hypergrad(name, method):
    if isinstance(method, type):  # hypergrad=ml.hypergrad.CG: the class, not a method
        where = "ml.hypergrad." if method.__module__.startswith("mlodsl.hypergrad") else ""
        raise TypeError(f"level '{name}': hypergrad={method.__name__} is the class; use "
                        f"{where}{method.__name__}() (an instance, with its options)")
    if method is not None and not callable(getattr(method, "vjp", None)):
        raise TypeError(f"level '{name}': hypergrad must be a method with vjp(trajectory, cotangent), "
                        f"e.g. ml.hypergrad.Unroll(); got {method!r}")


def level(module, *, optimizer, data=None, depends_on=(), steps=1, hypergrad=None,
          start_from=None, tasks=False, name=None, project=None, read_mode="train", precision=None,
          clip_grad_norm=None, batch_per="update", shard=False):
    """Declare a level of a multilevel program (see the module docstring for the binding rules).

    Args:
        module: the parameters this level learns (an ``nn.Module``; ``ml.Hyper`` for loose tensors).
        optimizer: a functional optimizer from ``ml.optim``.
        data: a fixed batch (tuple or tensor), an iterable (cycled), or a callable returning a batch.
        depends_on: lower levels (objects or names) whose solution this level's loss goes through.
        steps: optimizer steps this level takes each time the level above it steps once.
        hypergrad: how this level's response is differentiated for the levels above it
            (default ``Unroll()``).
        start_from: ``None`` (warm start), ``"init"`` or an upper level (MAML).
        tasks: batch the level over a leading task dimension of its data.
        name: the level's name (default: the function's name).
        project: a constraint applied after every update, ``params -> params`` (a dict of tensors;
            see ``ml.constraints``), differentiable so that unrolled methods see it.
        read_mode: ``"train"`` (default) or ``"eval"``: the mode (dropout, BatchNorm) this level's
            module runs in when *another* level's function calls it. Its own function always runs
            it in train mode.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` for this level's loss (default: the
            Program's); fp16 levels get their own dynamic loss scale (``mlodsl.precision``).
        clip_grad_norm: clip this level's total gradient to this norm before each update.
        batch_per: ``"update"`` (default): every update draws the next batch of ``data``;
            ``"block"``: each block of ``steps`` updates draws one batch and takes all its updates
            on it ("for each batch: K inner steps on it, then one outer step"), so the data
            advances one batch per update of the level above.
        shard: under data parallel, each rank keeps a 1/world slice of this level's parameters and
            optimizer state, gathered where its loss runs (ZeRO-3/FSDP; ``mlodsl.sharding``). For a
            level without lower levels; a single process ignores it.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"@level needs the nn.Module the level learns as its first argument "
                        f"(ml.Hyper(name=tensor) for loose tensors); got {type(module).__name__}")
    if isinstance(depends_on, (Level, str)):
        depends_on = (depends_on,)

    def decorate(fn: Callable) -> Level:
        level_name = name or fn.__name__
        learned = _uncompiled(level_name, module)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"level '{level_name}': steps must be a positive int, got {steps!r}")
        _check_optimizer(level_name, optimizer)
        _check_hypergrad(level_name, hypergrad)
        for dep in depends_on:
            if not isinstance(dep, (Level, str)):
                raise TypeError(f"level '{level_name}': depends_on takes levels or level names, got {dep!r}")
        params = list(inspect.signature(fn).parameters.values())
        if not params:
            raise TypeError(f"level '{level_name}': the function must take the level's own module first")
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"level '{level_name}': *args/**kwargs cannot be bound; name each level")
        own, rest = params[0].name, [p.name for p in params[1:]]
        takes_batch = "batch" in rest
        # A parameter with a default is not a level binding: it keeps its default (the `i=i` idiom).
        level_args = tuple(p.name for p in params[1:] if p.name != "batch" and p.default is p.empty)
        if data is None and takes_batch:
            raise ValueError(f"level '{level_name}': the function takes `batch` but the level has no data=")
        if data is not None and not takes_batch:  # the data would be drawn and silently ignored
            raise ValueError(f"level '{level_name}': data= is given but the function has no `batch` parameter; "
                             f"add one (def {level_name}({own}, batch, ...)) or drop data=")
        if start_from is not None and start_from != "init" and not isinstance(start_from, (Level, str)):
            raise ValueError(f"level '{level_name}': start_from must be None, 'init' or an upper level")
        if read_mode not in ("train", "eval"):
            raise ValueError(f"level '{level_name}': read_mode must be 'train' or 'eval', got {read_mode!r}")
        if precision is not None:
            from .precision import check
            check(precision, f"level '{level_name}'")
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"level '{level_name}': clip_grad_norm must be a positive number, got {clip_grad_norm!r}")
        if batch_per not in ("update", "block"):
            raise ValueError(f"level '{level_name}': batch_per must be 'update' (a batch per update) or 'block' "
                             f"(one batch for each block of steps={steps} updates), got {batch_per!r}")
        if batch_per == "block" and data is None:
            raise ValueError(f"level '{level_name}': batch_per='block' but the level has no data= to draw from")
        if project is not None and not callable(project):
            raise TypeError(f"level '{level_name}': project must be a function params -> params")
        if not isinstance(shard, bool):
            raise TypeError(f"level '{level_name}': shard must be True or False, got {shard!r}")
        return Level(fn=fn, module=learned, optimizer=as_optimizer(optimizer), data=data, depends_on=tuple(depends_on),
                     steps=steps, hypergrad=hypergrad, start_from=start_from, tasks=tasks,
                     project=project, read_mode=read_mode, precision=precision, clip_grad_norm=clip_grad_norm,
                     batch_per=batch_per, shard=shard, name=level_name, own_arg=own, level_args=level_args,
                     takes_batch=takes_batch)

    return decorate


def _uncompiled(level_name: str, module: nn.Module) -> nn.Module:
    """The module a ``torch.compile``'d module wraps: the level learns and traces that one. fx cannot
    trace dynamo's wrapper (the level would run as an opaque call, compiled again at every shape);
    ``Program(compile=True)`` compiles the pieces of the step instead, around the traced graphs."""
    wrapped = getattr(module, "_orig_mod", None)
    if not (isinstance(wrapped, nn.Module) and type(module).__name__ == "OptimizedModule"):
        return module
    warnings.warn(f"level '{level_name}': its module is torch.compile'd; the level learns and traces the module it "
                  f"wraps (parameters named without '_orig_mod.'). To compile, build the Program with "
                  f"compile=True, which compiles the step's pieces around the traced losses.", stacklevel=3)
    return wrapped
