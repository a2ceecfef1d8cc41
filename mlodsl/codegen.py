"""Code generation: the Python source of the fused step, from the plan.

The source defines, for every level X,

* ``block_X``: X's loop (``steps`` updates), keeping the iterates its hypergradient method needs;
* ``gradient_X``: X's total gradient at one update: its lower blocks run first, then the partial
  derivatives of X's loss (``torch.func.grad``) plus one best-response VJP per lower level;
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
import keyword
import linecache
import os
import re
import tempfile

from .plan import Plan


def level_identifiers(names) -> dict:
    """A unique Python identifier for every level name: ``low-a`` and ``low_a`` must not both
    become ``low_a`` (the second level's functions would silently replace the first's)."""
    out, taken = {}, set()
    for name in names:
        base = re.sub(r"\W", "_", name)
        if not base.isidentifier() or keyword.iskeyword(base):
            base = "_" + base
        candidate, n = base, 1
        while candidate in taken:
            candidate, n = f"{base}_{n}", n + 1
        out[name] = candidate
        taken.add(candidate)
    return out


def _block_fn(ids, name, steps, subtree, method, restarts, leaf, uppers) -> list:
    """``method``: the lower level's hypergradient method (it says which iterates to keep); ``leaf``:
    the level has no lower levels (its update is one compiled region, and so is the update's VJP);
    ``uppers``: the levels whose hypergradients go through this block (``rt.tape`` records the
    block on the autograd tape from their parameters when the method asks for it)."""
    f = ids[name]
    stride = method.path_stride(steps) if hasattr(method, "path_stride") else 1
    lines = [
        f"    def block_{f}(state, up, i, log, B):",
        f'        """{steps} update(s) of {name!r} from `state`, keeping the iterates {method!r} needs."""',
        f"        s = rt.restrict(state, {subtree!r})",
        f"        up_{f} = rt.outside(state, up, {subtree!r})",
        f"        up_{f}, tape = rt.tape({name!r}, s, up_{f}, {uppers!r})"]
    if restarts:
        lines += ["        s0 = s",
                  f"        s = rt.begin({name!r}, s0, up_{f})"]
    lines += [
        f"        start, path = s, ({{0: s}} if method[{name!r}].keeps_path and tape is None else None)"]
    loop = leaf and stride == 1  # the K updates as one compiled region (compile=True), when they can be
    indent = "    " if loop else ""
    if leaf:  # the block's batches, one per update (a compiled loop's input; MixedUnroll's update_split)
        lines += [f"        batches = [B[{name!r}][i * {steps} + k] for k in range({steps})]"]
    if loop:
        lines += [
            f"        looped = rt.run_loop(loop_{f}, s, up_{f}, batches, path is not None, log)",
            "        if looped is not None:",
            "            s, path = looped",
            "        else:"]
    lines += [
        f"        {indent}with rt.recording(tape):",
        f"        {indent}    for k in range({steps}):",
        f"        {indent}        s = advance_{f}(s, up_{f}, i * {steps} + k, log, B)",
        f"        {indent}        if path is not None and ((k + 1) % {stride} == 0 or k == {steps - 1}):",
        f"        {indent}            path[k + 1] = s",
        f"        record = rt.block({name!r}, {steps}, start, s, path, up_{f},",
        f"                          lambda s_, up_, k: advance_{f}(s_, up_, i * {steps} + k, None, B),",
        f"                          B[{name!r}][i * {steps} + {steps - 1}]" + (
            f",\n                          lambda up_: rt.begin({name!r}, s0, up_)" if restarts else ""
        ) + ", log=log" + (
            f",\n                          update_vjp=lambda s_, up_, upper, k, ct: "
            f"update_vjp_{f}(s_, up_, upper, B[{name!r}][i * {steps} + k], ct)" if leaf else "") + ", tape=tape" + (
            f",\n                          loop=loop_{f}" if loop else "") + (
            ", batches=batches" if leaf else "") + ")",
        "        return rt.untaped(s, tape), record",
        "",
    ]
    return lines


def _wrt(name, lowers, taken, subtree) -> tuple:
    """The levels X's loss is differentiated in: X, and every level its lower blocks run that it takes."""
    return (name,) + tuple(dict.fromkeys(n for c in lowers for n in subtree[c] if n in taken or n == c))


def _partials_fn(ids, name, wrt) -> list:
    f = ids[name]
    return [f"    partials_{f} = rt.region({name!r}, 'partial gradients', lambda params, batch, log: rt.partials(",
            f"        {name!r}, params, batch, {wrt!r}, log), trailing=1)",
            ""]


def _update_fn(ids, name) -> list:
    """One update of a level with no lower levels, from its batch: one compiled region, and its VJP another."""
    f = ids[name]
    return [f"    def update_{f}(sub, up, batch, log):",
            f'        """One update of {name!r} from its batch: (new state, loss, metrics, gradient norm)."""',
            f"        loss, metrics, g = rt.partials({name!r}, {{**up, **rt.params_of(sub)}}, batch, ({name!r},), log)",
            f"        return rt.apply_update({name!r}, sub, up, g[{name!r}]), loss, metrics, rt.grad_norm(g[{name!r}])",
            "",
            f"    update_vjp_{f} = rt.update_vjp({name!r}, update_{f})",
            f"    loop_{f} = rt.update_loop({name!r}, update_{f})",
            f"    update_{f} = rt.region({name!r}, 'update', update_{f}, trailing=1)",
            "",
            f"    def advance_{f}(sub, up, i, log, B):",
            f'        """One update of {name!r}: a pure function of the block state."""',
            f"        sub, loss, metrics, norm = update_{f}(sub, up, B[{name!r}][i], log)",
            f"        rt.record(log, {name!r}, loss, metrics, norm)",
            "        return sub",
            ""]


def _gradient_fn(ids, name, children, shared, lowers, taken, subtree, suffix="") -> list:
    """``taken``: the levels X's loss takes; ``subtree``: level -> the levels its block runs."""
    f = ids[name]
    sig = "sub, up, i, log, B" + (", shared" if shared else "")
    below = _wrt(name, lowers, taken, subtree)[1:]
    lines = [f"    def gradient_{f}{suffix}({sig}):",
             f'        """Total gradient of {name!r} at its update i (its lower levels run first)."""']
    for c in children:
        lines += [f"        s, block_{ids[c]}_ = block_{ids[c]}(sub, up, i, log, B)",
                  "        sub = {**sub, **s}"]
    lines += [f"        loss, metrics, g = partials_{f}({{**up, **rt.params_of(sub)}}, B[{name!r}][i], log)",
              f"        g_{f} = g[{name!r}]"]
    for c in lowers:
        record = f"block_{ids[c]}_" if c in children else f"shared[{c!r}]"
        ct = ", ".join(f"{n!r}: g[{n!r}]" for n in subtree[c] if n in below)
        lines.append(f"        g_{f} = rt.add(g_{f}, rt.best_response_vjp({c!r}, {name!r}, {record}, {{{ct}}}))")
    lines += [f"        return g_{f}, sub, loss, metrics", ""]
    return lines


def _tasks_fn(ids, name, tasked, taped) -> list:
    """The upper level of a level batched over tasks: its gradient, vmapped over the tasks, averaged.
    ``taped``: the tasked level is the only lower level and its method may record the tape
    (``Unroll``): where ``rt.tape_tasks`` allows, the tasks' mean loss is computed under ``vmap``
    on the autograd tape and differentiated by one backward pass (as a hand-written MAML does)."""
    f, t = ids[name], ids[tasked]
    lines = [f"    def gradient_{f}(sub, up, i, log, B):",
             f'        """Total gradient of {name!r}, averaged over the tasks of {tasked!r} '
             '(one vmapped computation)."""']
    if taped:
        lines += [
            f"        leaves = rt.tape_tasks({tasked!r}, {name!r}, sub, up)",
            "        if leaves is not None:  # the mean task loss on the tape, then one backward pass",
            f"            sub_ = {{**sub, {name!r}: {{**sub[{name!r}], 'params': leaves}}}}",
            "            def task_loss(sub_task, B_task):",
            f"                s, _ = block_{t}({{**sub_, **sub_task}}, up, i, None, {{**B, **B_task}})",
            "                params = {**up, **rt.params_of({**sub_, **s})}",
            f"                return rt.evaluate({name!r}, params, B_task[{name!r}][i])[0], "
            f"rt.restrict(s, [{tasked!r}])",
            f"            loss, sub_{t} = vmap(task_loss, randomness='different')(",
            f"                rt.restrict(sub, [{tasked!r}]), {{{tasked!r}: B[{tasked!r}], {name!r}: B[{name!r}]}})",
            "            g = rt.tape_gradient(loss.mean(), leaves)",
            f"            return g, {{**sub, **rt.untaped(sub_{t}, leaves)}}, loss.mean().detach(), {{}}"]
    return lines + [
            "        def one_task(sub_task, B_task):",
            f"            g, s, loss, _ = gradient_{f}_one_task({{**sub, **sub_task}}, up, i, None, {{**B, **B_task}})",
            f"            return g, rt.restrict(s, [{tasked!r}]), loss",
            f"        g, sub_{t}, loss = vmap(one_task, randomness='different')(",
            f"            rt.restrict(sub, [{tasked!r}]), {{{tasked!r}: B[{tasked!r}], {name!r}: B[{name!r}]}})",
            f"        return rt.mean_over_tasks(g), {{**sub, **sub_{t}}}, loss.mean(), {{}}",
            ""]


def _advance_fn(ids, name, shared) -> list:
    f = ids[name]
    extra = ", shared" if shared else ""
    return [f"    def advance_{f}(sub, up, i, log, B{extra}):",
            f'        """One update of {name!r}: a pure function of the block state."""',
            f"        g_{f}, sub, loss, metrics = gradient_{f}(sub, up, i, log, B{extra})",
            f"        rt.record(log, {name!r}, loss, metrics, rt.grad_norm(g_{f}))",
            f"        return rt.apply_update({name!r}, sub, up, g_{f})",
            ""]


def generate(plan: Plan, levels: dict, methods: dict, title: str, taken: dict | None = None) -> str:
    """The source of ``make_step(rt) -> (step, hypergradient)`` for ``plan``; ``taken`` maps each
    level to the levels whose parameters its loss takes (default: itself and its arguments; a
    function may also read levels through closures)."""
    shared = {n for n, p in plan.parent.items() if p is None and any(n in lw for lw in plan.lowers.values())}
    tasked = sorted({n for n in plan.subtree if levels[n].tasks} |  # vmap draws their random numbers
                    {u for u in plan.subtree if any(levels[c].tasks for c in plan.lowers[u])})
    tops = [b.level for b in plan.blocks if b.level not in shared]
    ids = level_identifiers(plan.subtree)
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
        children = [c for c in lowers if plan.parent[c] == name]
        has_shared = any(c in shared for c in lowers)
        if plan.parent[name] is not None or name in shared:
            uppers = [u for u in plan.subtree if name in plan.lowers[u]]
            out += _block_fn(ids, name, levels[name].steps, list(plan.subtree[name]), methods[name],
                            levels[name].start_from is not None, not lowers, uppers)
        takes = taken[name] if taken is not None else {name, *levels[name].level_args}
        tasked = [c for c in lowers if levels[c].tasks]
        suffix = "_one_task" if tasked else ""
        out += _partials_fn(ids, name, _wrt(name, lowers, takes, plan.subtree))
        out += _gradient_fn(ids, name, children, has_shared, lowers, takes, plan.subtree, suffix)
        if tasked:
            taped = (list(lowers) == tasked[:1] and not plan.lowers[tasked[0]]
                     and getattr(methods[tasked[0]], "records_tape", False))
            out += _tasks_fn(ids, name, tasked[0], taped)
        out += _update_fn(ids, name) if not lowers else _advance_fn(ids, name, has_shared)

    out += ["    def step(state, B):",
            f'        """One step of {title}: (state, batches) -> (new state, log)."""',
            "        log = rt.new_log()",
            f"        B = rt.seeded(state, B, {tasked!r})"
            "  # one seed per update of a lower level that draws random numbers"] + (
            ["        shared = {}"] if shared else [])
    for n in shared:
        out += [f"        s, shared[{n!r}] = block_{ids[n]}(state, {{}}, 0, log, B)",
                "        state = {**state, **s}"]
    for t in tops:
        has_shared = any(c in shared for c in plan.lowers[t])
        out += [f"        for t in range({levels[t].steps}):",
                f"            sub = advance_{ids[t]}(rt.restrict(state, {list(plan.subtree[t])!r}), "
                f"rt.outside(state, {{}}, {list(plan.subtree[t])!r}), t, log, B{', shared' if has_shared else ''})",
                "            state = {**state, **sub}"]
    out += ["        return state, log", ""]

    out += ["    def hypergradient(name, state, B):",
            '        """(total gradient, loss) of level `name` at its next update; changes nothing."""',
            f"        B = rt.seeded(state, B, {tasked!r})"]
    out += ["        shared = {}"] if shared else []
    for n in shared:
        out += [f"        if name != {n!r} and name not in {list(plan.subtree[n])!r}:",
                f"            s, shared[{n!r}] = block_{ids[n]}(state, {{}}, 0, None, B)",
                "            state = {**state, **s}"]
    for name in plan.subtree:
        has_shared = any(c in shared for c in plan.lowers[name])
        sub = list(plan.subtree[name])
        out += [f"        if name == {name!r}:",
                f"            return gradient_{ids[name]}(rt.restrict(state, {sub!r}), "
                f"rt.outside(state, {{}}, {sub!r}), "
                f"0, None, B{', shared' if has_shared else ''})[::2]"]
    out += ["        raise KeyError(name)", "", "    return step, hypergradient", ""]
    return "\n".join(out)


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
