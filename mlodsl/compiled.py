"""The compile stage: ``torch.compile`` regions of the generated step.

The generated step is not compiled as one graph: inlining K unrolled updates makes the compile
time grow with K (minutes for K = 100), and ``torch.compile`` refuses a second backward through a
compiled region. Instead, the pieces a step repeats are compiled once each and called from the
step's Python loops:

* ``update``: one optimizer update of a level with no lower levels (its gradient by
  ``torch.func.grad`` inside the region), called K times by its block;
* ``update_vjp``: the VJP of that update, ``(λ, S_k) ↦ (∂S_{k+1}/∂S_k ᵀ λ, ∂S_{k+1}/∂θ_U ᵀ λ)``,
  called K times by ``Unroll``'s reverse loop (the "two-pass" form: a forward loop keeps the
  iterates, a reverse loop of compiled VJPs carries the cotangent);
* ``partials``: a level's loss and partial gradients, once per update of an upper level;
* a level's K updates, and ``Unroll``'s reverse pass over them, as one ``scan`` each
  (``mlodsl.loops``; where they can run that way, they replace the K calls above);
* an implicit method's hypergradient products (``Runtime.best_response_vjp``).

Each region returns plain tensors (every derivative it needs is taken inside it), so nothing ever
differentiates *through* a compiled region. When something must (a level above unrolls through
this one with the autograd tape, or ``Forward`` pushes tangents through it under ``torch.func.jvp``),
the region runs its eager function instead: the same numbers, by the same code. A region that
``torch.compile`` cannot handle warns once, says why, and runs eagerly from then on.
"""
from __future__ import annotations

import types
import warnings
from typing import Callable

import torch

from . import autodiff


class CompileWarning(UserWarning):
    """A region of the step could not be compiled and runs eagerly."""


# The compile budget: under compile=True, a level whose traced graph has more operations than this
# runs eagerly, with a CompileWarning (``Program(compile={"max_ops": n})`` moves it; None: no budget).
# Measured on this project's 2-core CPU (docs/compile.md): transformer levels of 66-111 operations
# took 1-4 minutes to their first compiled step and then ran slower than eager; the largest graphs
# the examples compile (a DARTS cell, 43 operations) stay under it.
MAX_OPS = 50


def graph_ops(traced) -> int | None:
    """The number of operations in a level's traced graph (None for an opaque level: unknown)."""
    if getattr(traced, "opaque", True) or getattr(traced, "graph", None) is None:
        return None
    return sum(1 for node in traced.graph.graph.nodes if node.op in ("call_function", "call_method", "call_module"))


def is_plain(args) -> bool:
    """True when no derivative has to flow through a call on ``args``: no tensor in them requires
    grad, no ``torch.func`` transform is active, and no enclosing tape product is evaluating."""
    if autodiff.inside_product() or autodiff.in_transform():
        return False
    return not _any_requires_grad(args)


def _any_requires_grad(tree) -> bool:
    # An explicit walk over dicts, lists and tuples: pytree's generic flattening costs more than
    # the compiled call it guards. Other objects (a batch of the user's own type) are data, which
    # no derivative is taken in.
    stack = [tree]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            if x.requires_grad:
                return True
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return False


class Region:
    """``fn`` compiled, called when its arguments are plain (``is_plain``), else ``fn`` itself.

    ``fn(*args)`` must be a pure function of the tensors in ``args``. ``trailing`` arguments (the
    step's log) are passed to the eager function only: a compiled region never sees them.
    ``traced``: what is compiled, when it is not ``fn`` itself but the same function written for
    the compiler (a loop as a ``scan``).
    """

    instead = "it runs eagerly"  # what happens when it cannot be compiled

    def __init__(self, label: str, fn: Callable, options: dict, trailing: int = 0, traced: Callable | None = None):
        self.label, self.fn, self.trailing = label, fn, trailing
        self.reason = None  # why it runs eagerly, once compiling failed
        self.compiled_calls = 0
        # fullgraph by default: a region is one graph or, with the reason, eager (a graph break
        # inside torch.func.grad would otherwise fall back silently).
        self._compiled = torch.compile(_own_code(_without_trailing(traced or fn, trailing)),
                                       **{"fullgraph": True, **options})

    def __call__(self, *args):
        core = args[:len(args) - self.trailing]
        if self.reason is not None or not is_plain(core):
            return self.fn(*args)
        try:
            # Dynamo traces torch.func transforms, not the autograd tape. And it keeps a Python float
            # (a learning rate) a constant: one it has seen change, in any program of the process
            # (its automatic-dynamic record is keyed by the source line), it would otherwise pass as
            # a float32 tensor, and a float64 program's update would be off by 1e-8 relative.
            with autodiff.torch_func_products(), torch._dynamo.config.patch(specialize_float=True):
                out = self._compiled(*core)
        except Exception as err:  # noqa: BLE001 - any compiler failure means: run eagerly
            if not _is_compiler_error(err):
                raise
            self.reason = f"{type(err).__name__}: {_first_reason(err)}"
            warnings.warn(f"{self.label} could not be compiled ({self.reason}); {self.instead}",
                          CompileWarning, stacklevel=2)
        if self.reason is not None:  # eagerly, as if never compiled (the tape, not torch.func)
            return self.fn(*args)
        self.compiled_calls += 1
        return out

    def __repr__(self) -> str:
        return f"Region({self.label!r}{', eager: ' + self.reason if self.reason else ''})"


def _first_reason(err: Exception) -> str:
    """The first line of a compiler error that says something (a higher-order operator's error
    opens with "Got graph break/error:" and gives the reason on the lines after)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if not line.endswith(":"):
            return line if i == 0 else f"{lines[i - 1]} {line}"
    return lines[0] if lines else ""


def _without_trailing(fn: Callable, trailing: int) -> Callable:
    def region(*args):
        return fn(*args, *([None] * trailing))
    return region


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. Dynamo keeps its compiled graphs on the code object
    (at most ``recompile_limit`` of them), and every region is made by the same ``def``: without
    a copy, a few programs in one process would exhaust the limit."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def _is_compiler_error(err: Exception) -> bool:
    """Errors of dynamo, AOTAutograd or inductor (an error of the user's own code is re-raised by
    the eager run that follows, at the user's line)."""
    module = type(err).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "torch.fx",
                              "torch._subclasses", "torch._higher_order_ops")) or isinstance(
        err, (NotImplementedError, AssertionError))


class Compiler:
    """Makes the regions of one program. ``options``: keyword arguments of ``torch.compile``
    (``{"mode": "max-autotune-no-cudagraphs"}``, ``{"backend": "aot_eager"}``); ``None``: eager.

    ``eager_levels`` maps a level to the reason it is not compiled (decided at build time: running
    statistics, data parallel, a dynamic fp16 loss scale).
    """

    def __init__(self, options: dict | None, eager_levels: dict | None = None):
        self.options = options
        self.eager_levels = dict(eager_levels or {})
        self.regions: list[Region] = []
        for name, why in self.eager_levels.items():
            if options is not None:
                warnings.warn(f"level '{name}' runs eagerly under compile=True: {why}", CompileWarning, stacklevel=3)

    def compiles(self, level: str) -> bool:
        """Whether ``level``'s regions are compiled."""
        return self.options is not None and level not in self.eager_levels

    def region(self, level: str, what: str, fn: Callable, trailing: int = 0, traced: Callable | None = None,
               loop: bool = False) -> Callable:
        """``fn`` as a compiled region of ``level`` (``fn`` itself when eager); see ``Region``.
        ``loop``: the region is a loop (``mlodsl.loops``), compiled with ``loop_options``."""
        if not self.compiles(level):
            return fn
        region = Region(f"level '{level}': its {what}", fn, self.loop_options() if loop else self.options,
                        trailing, traced)
        if loop:
            region.instead = "its updates run one region each instead"
        self.regions.append(region)
        return region

    def loop_options(self) -> dict:
        """The options of a loop region: the program's, with inductor's C++ wrapper unless they say
        otherwise. The wrapper runs the loop body's kernels K times per call, and a C++ one costs a
        fraction of a Python one per kernel (B1: 4.5 against 9.7 ms per outer step; the same
        compile time from an empty cache here)."""
        options = dict(self.options or {})
        if options.get("backend", "inductor") != "inductor" or "mode" in options:
            return options  # torch.compile takes inductor options alone, and not with a mode
        inductor = dict(options.get("options") or {})
        inductor.setdefault("cpp_wrapper", True)
        return {**options, "options": inductor}

    def __repr__(self) -> str:
        if self.options is None:
            return "Compiler(eager)"
        lines = [f"Compiler({self.options})"] + [f"  {r!r}: {r.compiled_calls} compiled calls" for r in self.regions]
        lines += [f"  level '{n}' eager: {why}" for n, why in self.eager_levels.items()]
        return "\n".join(lines)
