"""Code generation: the Python source of the fused step, from the plan.

The source defines, for every level X,

* ``block_X``: X's loop (``steps`` updates), keeping the iterates its hypergradient method needs;
* ``gradient_X``: X's total gradient at one update: its lower blocks run first, then the partial
  derivatives of X's loss (``torch.func.grad``) plus one best-response VJP per lower block (per
  shared block that ran above X, from its record in ``shared``);
* ``group_X``: where X's update runs a block shared by several uppers (``plan.groups``), that block
  and its uppers' blocks, a pure function of X's block state: X's gradient runs it, and its VJP in
  X's parameters (the blocks unrolled together) is X's hypergradient through them;
* ``advance_X``: one optimizer update of X, a pure function of the block state;
* ``partials_X``: X's loss and partial gradients; for a level with no lower levels, ``update_X``
  (one whole update from its batch) and ``update_vjp_X`` (that update's VJP, for ``Unroll``).
  These three are the regions ``torch.compile`` compiles under ``compile=True`` (``rt.region``,
  ``mlodsl.compiled``); eagerly they are the plain functions; and ``loop_X``, X's K updates (and
  Unroll's reverse pass over them) as one compiled ``scan`` each (``mlodsl.loops``), which
  ``rt.run_loop`` declines (None) where the Python loop must run;

and ``step(state, B)``, one ``Program.step()``: the top levels' loops. Loops stay loops; nothing is
inlined per step. ``make_step(rt)`` binds the runtime (traced losses, optimizers, methods).
"""
from __future__ import annotations

import hashlib
import linecache
import os
import tempfile
from types import SimpleNamespace

from .names import Namespace
from .plan import Plan


# The generated step's identifiers of each level X (``{}``: X's identifier), and the names the
# source uses that are not derived from a level (none may be taken by a level's).
_LEVEL_NAMES = {"block": "block_{}", "record": "block_{}_", "gradient": "gradient_{}",
                "one_task": "gradient_{}_one_task", "partials": "partials_{}", "update": "update_{}",
                "update_vjp": "update_vjp_{}", "loop": "loop_{}", "advance": "advance_{}",
                "up": "up_{}", "g": "g_{}", "sub": "sub_{}", "group": "group_{}"}
_FIXED_NAMES = ("make_step", "rt", "method", "vmap", "step", "hypergradient", "state", "B", "log", "sub",
                "up", "i", "k", "t", "s", "s0", "s_", "up_", "sub_", "g", "loss", "metrics", "norm", "record",
                "start", "path", "tape", "batches", "looped", "shared", "leaves", "task_loss", "one_task",
                "sub_task", "B_task", "task_log", "outcomes", "params", "batch", "name", "upper", "ct", "print",
                "range", "KeyError")


def level_identifiers(names) -> dict:
    """A unique Python identifier for every level name: ``low-a`` and ``low_a`` must not both
    become ``low_a`` (the second is ``low_a_1``)."""
    ns = Namespace()
    return {name: ns.create(name, name) for name in names}


class StepNames:
    """The identifiers of the generated step: ``names[level].block`` (``.gradient``, ``.up``, ...,
    the keys of ``_LEVEL_NAMES``), all from one ``Namespace``, so that no two levels' functions or
    locals share a name however their names read (``a`` and ``vjp_a`` both want ``update_vjp_a``)."""

    def __init__(self, levels):
        ids = level_identifiers(levels)
        ns = Namespace(_FIXED_NAMES)
        self._levels = {}
        for name in levels:  # in level order, so that the first level keeps the plain names
            self._levels[name] = SimpleNamespace(**{kind: ns.create(pattern.format(ids[name]), (kind, name))
                                                    for kind, pattern in _LEVEL_NAMES.items()})

    def __getitem__(self, level: str) -> SimpleNamespace:
        return self._levels[level]


def _block_fn(ids, name, steps, subtree, method, restarts, leaf, uppers, shared=False) -> list:
    """``method``: the lower level's hypergradient method (it says which iterates to keep); ``leaf``:
    the level has no lower levels (its update is one compiled region, and so is the update's VJP);
    ``uppers``: the levels whose hypergradients go through this block by its method (``rt.tape``
    records the block on the autograd tape from their parameters when the method asks for it);
    ``shared``: the level reads the records of shared blocks that ran above it."""
    f = ids[name]
    arg = ", shared" if shared else ""
    stride = method.path_stride(steps)
    lines = [
        f"    def {f.block}(state, up, i, log, B{arg}):",
        f'        """{steps} update(s) of {name!r} from `state`, keeping the iterates {method!r} needs."""',
        f"        s = rt.restrict(state, {subtree!r})",
        f"        {f.up} = rt.outside(state, up, {subtree!r})",
        f"        {f.up}, tape = rt.tape({name!r}, s, {f.up}, {uppers!r})"]
    if restarts:
        lines += ["        s0 = s",
                  f"        s = rt.begin({name!r}, s0, {f.up})"]
    lines += [
        f"        start, path = s, ({{0: s}} if method[{name!r}].keeps_path and tape is None else None)"]
    loop = leaf and stride == 1  # the K updates as one compiled region (compile=True), when they can be
    indent = "    " if loop else ""
    if leaf:  # the block's batches, one per update (a compiled loop's input; MixedUnroll's update_split)
        lines += [f"        batches = [B[{name!r}][i * {steps} + k] for k in range({steps})]"]
    if loop:
        lines += [
            f"        looped = rt.run_loop({f.loop}, s, {f.up}, batches, path is not None, log)",
            "        if looped is not None:",
            "            s, path = looped",
            "        else:"]
    lines += [
        f"        {indent}with rt.recording(tape):",
        f"        {indent}    for k in range({steps}):",
        f"        {indent}        s = {f.advance}(s, {f.up}, i * {steps} + k, log, B{arg})",
        f"        {indent}        if path is not None and ((k + 1) % {stride} == 0 or k == {steps - 1}):",
        f"        {indent}            path[k + 1] = s",
        f"        record = rt.block({name!r}, {steps}, start, s, path, {f.up},",
        f"                          lambda s_, up_, k: {f.advance}(s_, up_, i * {steps} + k, None, B{arg}),",
        f"                          B[{name!r}][i * {steps} + {steps - 1}]" + (
            f",\n                          lambda up_: rt.begin({name!r}, s0, up_)" if restarts else ""
        ) + ", log=log" + (
            f",\n                          update_vjp=lambda s_, up_, upper, k, ct: "
            f"{f.update_vjp}(s_, up_, upper, B[{name!r}][i * {steps} + k], ct)" if leaf else "") + ", tape=tape" + (
            f",\n                          loop={f.loop}" if loop else "") + (
            ", batches=batches" if leaf else "") + ")",
        "        return rt.untaped(s, tape), record",
        "",
    ]
    return lines


def _wrt(name, plan, taken) -> tuple:
    """The levels X's loss is differentiated in: X, and every level that the blocks before its
    update run (its own block's, and the shared ones above it) that it takes or depends on."""
    lowers, subtree = plan.lowers[name], plan.subtree
    below = list(subtree[name][1:]) + [n for c in plan.outside.get(name, ()) for n in subtree[c]]
    return (name,) + tuple(dict.fromkeys(n for n in below if n in taken or n in lowers))


def _partials_fn(ids, name, wrt) -> list:
    f = ids[name]
    return [f"    {f.partials} = rt.region({name!r}, 'partial gradients', lambda params, batch, log: rt.partials(",
            f"        {name!r}, params, batch, {wrt!r}, log), trailing=1)",
            ""]


def _update_fn(ids, name) -> list:
    """One update of a level with no lower levels, from its batch: one compiled region, and its VJP another."""
    f = ids[name]
    return [f"    def {f.update}(sub, up, batch, log):",
            f'        """One update of {name!r} from its batch: (new state, loss, metrics, gradient norm)."""',
            f"        loss, metrics, g = rt.partials({name!r}, {{**up, **rt.params_of(sub)}}, batch, ({name!r},), log)",
            f"        new = rt.apply_update({name!r}, sub, up, g[{name!r}], batch)",
            f"        return new, loss, metrics, rt.grad_norm(g[{name!r}])",
            "",
            f"    {f.update_vjp} = rt.update_vjp({name!r}, {f.update})",
            f"    {f.loop} = rt.update_loop({name!r}, {f.update})",
            f"    {f.update} = rt.region({name!r}, 'update', {f.update}, trailing=1)",
            "",
            f"    def {f.advance}(sub, up, i, log, B):",
            f'        """One update of {name!r}: a pure function of the block state."""',
            f"        sub, loss, metrics, norm = {f.update}(sub, up, B[{name!r}][i], log)",
            f"        rt.record(log, {name!r}, loss, metrics, norm)",
            "        return sub",
            ""]


def _gradient_fn(ids, name, plan, wrt, suffix="") -> list:
    """``wrt``: the levels X's loss is differentiated in (``_wrt``)."""
    f = ids[name]
    outside, group = plan.outside.get(name, ()), plan.groups.get(name, ())
    kids = [c for c in plan.children[name] if c not in group]  # lower levels, each differentiated by its method
    sig = "sub, up, i, log, B" + (", shared" if outside else "")
    lines = [f"    def {f.one_task if suffix else f.gradient}({sig}):",
             f'        """Total gradient of {name!r} at its update i (its lower levels run first)."""']
    if group:
        lines += ["        start = sub",
                  f"        sub = gro{f.up}(sub, up, i, log, B)"]
    for c in kids:
        lines += [f"        s, {ids[c].record} = {ids[c].block}(sub, up, i, log, B)",
                  "        sub = {**sub, **s}"]
    lines += [f"        loss, metrics, g = {f.partials}({{**up, **rt.params_of(sub)}}, B[{name!r}][i], log)",
              f"        {f.g} = g[{name!r}]"]

    def cotangent(blocks):
        return "{" + ", ".join(f"{n!r}: g[{n!r}]" for b in blocks for n in plan.subtree[b] if n in wrt[1:]) + "}"

    for c in kids:
        lines.append(f"        {f.g} = rt.add({f.g}, rt.best_response_vjp({c!r}, {name!r}, {ids[c].record}, "
                     f"{cotangent([c])}))")
    for c in outside:
        lines.append(f"        {f.g} = rt.add({f.g}, rt.best_response_vjp({c!r}, {name!r}, shared[{c!r}], "
                     f"{cotangent([c])}))")
    if group:
        lines.append(f"        {f.g} = rt.add({f.g}, rt.group_vjp({name!r}, lambda s_: gro{f.up}(s_, up, i, None, B), "
                     f"start, {cotangent(group)}))")
    lines += [f"        return {f.g}, sub, loss, metrics", ""]
    return lines


def _group_fn(ids, name, plan) -> list:
    """The blocks of X's update that share a level: the shared ones first, then their uppers'."""
    f, group = ids[name], plan.groups[name]
    lines = [f"    def gro{f.up}(sub, up, i, log, B):",
             f'        """The blocks of {" + ".join(group)} in update i of {name!r}: pure in the block state."""',
             "        shared = {}"]
    for c in group:
        record = f"shared[{c!r}]" if c in plan.hosts else "_"
        lines += [f"        s, {record} = {ids[c].block}(sub, up, i, log, B{', shared' if c in plan.outside else ''})",
                  "        sub = {**sub, **s}"]
    return lines + ["        return sub", ""]


def _tasks_fn(ids, name, tasked, taped) -> list:
    """The upper level of a level batched over tasks: its gradient, vmapped over the tasks, averaged.
    ``taped``: the tasked level is the only lower level and its method may record the tape
    (``Unroll``): where ``rt.tape_tasks`` allows, the tasks' mean loss is computed under ``vmap``
    on the autograd tape and differentiated by one backward pass (as a hand-written MAML does)."""
    f, t = ids[name], ids[tasked]
    lines = [f"    def {f.gradient}(sub, up, i, log, B):",
             f'        """Total gradient of {name!r}, averaged over the tasks of {tasked!r} '
             '(one vmapped computation)."""']
    if taped:
        lines += [
            f"        leaves = rt.tape_tasks({tasked!r}, {name!r}, sub, up)",
            "        if leaves is not None:  # the mean task loss on the tape, then one backward pass",
            f"            sub_ = {{**sub, {name!r}: {{**sub[{name!r}], 'params': leaves}}}}",
            "            def task_loss(sub_task, B_task):",
            f"                s, _ = {t.block}({{**sub_, **sub_task}}, up, i, None, {{**B, **B_task}})",
            "                params = {**up, **rt.params_of({**sub_, **s})}",
            f"                return rt.evaluate({name!r}, params, B_task[{name!r}][i])[0], "
            f"rt.restrict(s, [{tasked!r}])",
            f"            loss, {t.sub} = vmap(task_loss, randomness='different')(",
            f"                rt.restrict(sub, [{tasked!r}]), {{{tasked!r}: B[{tasked!r}], {name!r}: B[{name!r}]}})",
            "            g = rt.tape_gradient(loss.mean(), leaves)",
            f"            return g, {{**sub, **rt.untaped({t.sub}, leaves)}}, loss.mean().detach(), {{}}"]
    return lines + [
            "        def one_task(sub_task, B_task):",
            "            task_log = rt.task_log()",
            f"            g, s, loss, _ = {f.one_task}({{**sub, **sub_task}}, up, i, task_log, {{**B, **B_task}})",
            f"            return g, rt.restrict(s, [{tasked!r}]), loss, rt.task_outcome(task_log)",
            f"        g, {t.sub}, loss, outcomes = vmap(one_task, randomness='different')(",
            f"            rt.restrict(sub, [{tasked!r}]), {{{tasked!r}: B[{tasked!r}], {name!r}: B[{name!r}]}})",
            "        rt.merge_task_outcomes(log, outcomes)",
            f"        return rt.mean_over_tasks(g), {{**sub, **{t.sub}}}, loss.mean(), {{}}",
            ""]


def _advance_fn(ids, name, shared) -> list:
    f = ids[name]
    extra = ", shared" if shared else ""
    return [f"    def {f.advance}(sub, up, i, log, B{extra}):",
            f'        """One update of {name!r}: a pure function of the block state."""',
            f"        {f.g}, sub, loss, metrics = {f.gradient}(sub, up, i, log, B{extra})",
            f"        rt.record(log, {name!r}, loss, metrics, rt.grad_norm({f.g}))",
            f"        return rt.apply_update({name!r}, sub, up, {f.g}, B[{name!r}][i])",
            ""]


def generate(plan: Plan, levels: dict, methods: dict, title: str, taken: dict | None = None) -> str:
    """The source of ``make_step(rt) -> (step, hypergradient)`` for ``plan``; ``taken`` maps each
    level to the levels whose parameters its loss takes (default: itself and its arguments; a
    function may also read levels through closures)."""
    shared = [c for c in plan.children[None] if c in plan.hosts]  # blocks step() runs before the tops
    tasked = sorted({n for n in plan.subtree if levels[n].tasks} |  # vmap draws their random numbers
                    {u for u in plan.subtree if any(levels[c].tasks for c in plan.lowers[u])})
    tops = [c for c in plan.children[None] if c not in plan.hosts]
    ids = StepNames(plan.subtree)
    # level -> the levels whose hypergradients go through its block by its method (not unrolled in a group)
    toward = {n: [u for u in plan.subtree if n in plan.outside.get(u, ())
                  or (plan.parent[n] == u and n not in plan.groups.get(u, ()))] for n in plan.subtree}
    out = [f"# The fused step of {title}, generated by mlodsl from its plan.",
           "# State: {level: {'params': {...}, 'opt': {...}}}; B: {level: [its batch for each update]}.",
           "",
           "from torch.func import vmap",
           "",
           "def make_step(rt):",
           "    method = rt.methods",
           ""]
    for name in plan.subtree:
        lowers = plan.lowers[name]
        has_shared = name in plan.outside
        if name not in tops:
            out += _block_fn(ids, name, levels[name].steps, list(plan.subtree[name]), methods[name],
                            levels[name].start_from is not None, not lowers, toward[name], has_shared)
        takes = taken[name] if taken is not None else {name, *levels[name].level_args}
        task_lowers = [c for c in lowers if levels[c].tasks]
        suffix = "_one_task" if task_lowers else ""
        wrt = _wrt(name, plan, takes)
        out += _partials_fn(ids, name, wrt)
        if name in plan.groups:
            out += _group_fn(ids, name, plan)
        out += _gradient_fn(ids, name, plan, wrt, suffix)
        if task_lowers:
            taped = (list(lowers) == task_lowers[:1] and not plan.lowers[task_lowers[0]]
                     and methods[task_lowers[0]].records_tape)
            out += _tasks_fn(ids, name, task_lowers[0], taped)
        out += _update_fn(ids, name) if not lowers else _advance_fn(ids, name, has_shared)

    out += ["    def step(state, B):",
            f'        """One step of {title}: (state, batches) -> (new state, log)."""',
            "        log = rt.new_log()",
            f"        B = rt.seeded(state, B, {tasked!r})"
            "  # one seed per update of a lower level that draws random numbers"] + (
            ["        shared = {}"] if shared else [])
    for n in shared:
        out += [f"        s, shared[{n!r}] = {ids[n].block}(state, {{}}, 0, log, B{', shared' * (n in plan.outside)})",
                "        state = {**state, **s}"]
    for t in tops:
        out += [f"        for t in range({levels[t].steps}):",
                f"            sub = {ids[t].advance}(rt.restrict(state, {list(plan.subtree[t])!r}), "
                f"rt.outside(state, {{}}, {list(plan.subtree[t])!r}), t, log, B{', shared' * (t in plan.outside)})",
                "            state = {**state, **sub}"]
    out += ["        return state, log", ""]

    out += ["    def hypergradient(name, state, B, log=None):",
            '        """(total gradient, loss) of level `name` at its next update, after the shared blocks it',
            '        reads (which run first, as in the step); changes nothing."""',
            f"        B = rt.seeded(state, B, {tasked!r})"]
    for name in plan.subtree:
        sub = list(plan.subtree[name])
        out += [f"        if name == {name!r}:"]
        needed = _shared_before(name, plan)
        out += ["            shared = {}"] if needed else []
        for n in needed:
            arg = ", shared" * (n in plan.outside)
            out += [f"            s, shared[{n!r}] = {ids[n].block}(state, {{}}, 0, log, B{arg})",
                    "            state = {**state, **s}"]
        out += [f"            return {ids[name].gradient}(rt.restrict(state, {sub!r}), "
                f"rt.outside(state, {{}}, {sub!r}), "
                f"0, log, B{', shared' * (name in plan.outside)})[::2]"]
    out += ["        raise KeyError(name)", "", "    return step, hypergradient", ""]
    return "\n".join(out)


def _shared_before(name, plan) -> list:
    """The shared blocks whose records level ``name`` reads, and those they read in turn, in the
    order their host runs them."""
    needed, pending = set(), list(plan.outside.get(name, ()))
    while pending:
        c = pending.pop()
        if c not in needed:
            needed.add(c)
            pending += plan.outside.get(c, ())
    return [c for c in plan.children[plan.parent[name]] if c in needed] if needed else []


def build(source: str, runtime):
    """Execute the generated source from a file of its own (named by its hash, in the temporary
    directory), so that tracebacks and debuggers show the real lines of the step."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), "mlodsl-steps")
    os.makedirs(folder, exist_ok=True)
    filename = os.path.join(folder, f"step_{digest}.py")
    if not os.path.exists(filename):
        tmp = f"{filename}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(source)
        os.replace(tmp, filename)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {"__file__": filename}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["make_step"](runtime), filename
