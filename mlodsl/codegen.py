"""Code generation: the Python source of the fused step, printed from the plan.

The plan's per-level decisions (``plan.levels``, a ``LevelPlan`` each: which iterates a block keeps,
whether it may record the tape, which regions compile, whether a method's VJP is its own source)
are the only input besides the schedule: the generator branches on them here, once, so the step
contains what runs for this program and nothing else. For every level X it writes some of

* ``block_X``: X's loop (``steps`` updates), keeping what X's hypergradient method needs;
* ``update_X``: one update of a level with no lower levels (its partial gradients, then its
  optimizer), a compiled region under ``compile=True``; ``advance_X``: one update of any level as a
  pure function of the block state (what a method that replays updates calls);
* ``gradient_X``: X's total gradient at one update: its lower blocks run first, then the partial
  derivatives of X's loss plus one best-response VJP per lower block;
* ``vjp_L_U``: lower level L's VJP toward upper U written as L's method's own source
  (``Method.source``: CG's solve on Hessian-vector products, FiniteDiff's two gradients), where
  the method gives one; other methods are called (``Method.vjp`` on the block's record);
* ``group_X``: where X's update runs a block shared by several uppers (``plan.groups``), those
  blocks together, a pure function of X's block state (X's hypergradient through them is their VJP);

and ``step(state, B)``. Each function is emitted only when the entry point reaches it: the step's
source (``prog.code``) and ``hypergradient(name, ...)``'s (``prog.hypergradient_code``) are two
programs printed from the same definitions. Loops stay loops; nothing is inlined per step.
``make_step(rt)`` binds the runtime (traced losses, optimizers, methods).
"""
from __future__ import annotations

import hashlib
import io
import linecache
import os
import re
import tempfile
import textwrap
import tokenize
from dataclasses import dataclass
from types import SimpleNamespace

from . import forward_mode
from .names import Namespace
from .plan import Plan


# The generated step's identifiers of each level X (``{}``: X's identifier), and the names the
# source uses that are not derived from a level (none may be taken by a level's).
_LEVEL_NAMES = {"block": "block_{}", "record": "block_{}_", "gradient": "gradient_{}",
                "one_task": "gradient_{}_one_task", "partials": "partials_{}", "update": "update_{}",
                "update_vjp": "update_vjp_{}", "loop": "loop_{}", "advance": "advance_{}",
                "up": "up_{}", "g": "g_{}", "sub": "sub_{}", "group": "group_{}", "vjp": "vjp_{}"}
_FIXED_NAMES = ("make_step", "make_hypergradient", "rt", "method", "vmap", "step", "hypergradient", "state",
                "B", "log", "sub", "up", "i", "k", "t", "s", "s0", "s_", "up_", "sub_", "g", "loss", "metrics",
                "norm", "record", "start", "path", "tape", "batches", "looped", "shared", "leaves", "task_loss",
                "one_task", "sub_task", "B_task", "task_log", "outcomes", "params", "batch", "name", "upper",
                "ct", "print", "range", "KeyError", "final", "v", "info", "solution", "hessian_vp", "cross_vjp",
                "joint_vp", "x", "scale", "g_plus", "g_minus", "products", "linear", "finite_diff", "losses")
# The modules a method's own source may use (``Method.source``), imported when the step uses them.
_METHOD_MODULES = ("finite_diff", "handover", "linear", "products")


def level_identifiers(names) -> dict:
    """A unique Python identifier for every level name: ``low-a`` and ``low_a`` must not both
    become ``low_a`` (the second is ``low_a_1``)."""
    ns = Namespace()
    return {name: ns.create(name, name) for name in names}


class StepNames:
    """The identifiers of the generated step: ``names[level].block`` (``.gradient``, ``.up``, ...,
    the keys of ``_LEVEL_NAMES``), all from one ``Namespace``, so that no two levels' functions or
    locals share a name however their names read (``a`` and ``vjp_a`` both want ``update_vjp_a``).
    ``names.vjp(lower, upper)``: the function of a lower level's VJP toward one upper."""

    def __init__(self, levels):
        self._ids = level_identifiers(levels)
        self._ns = Namespace(_FIXED_NAMES)
        self._levels = {}
        for name in levels:  # in level order, so that the first level keeps the plain names
            self._levels[name] = SimpleNamespace(**{kind: self._ns.create(pattern.format(self._ids[name]), (kind, name))
                                                    for kind, pattern in _LEVEL_NAMES.items()})

    def __getitem__(self, level: str) -> SimpleNamespace:
        return self._levels[level]

    def vjp(self, lower: str, upper: str, only: bool) -> str:
        """``vjp_<lower>`` when the lower level's block is differentiated toward one upper alone."""
        if only:
            return self._levels[lower].vjp
        return self._ns.create(f"vjp_{self._ids[lower]}_{self._ids[upper]}", ("vjp", lower, upper))


@dataclass
class Unit:
    """One definition of ``make_step``'s body: the names it defines and its lines."""

    defines: tuple
    lines: list


class _Writer:
    """Writes the definitions of one program from its plan (``units``), then prints the ones an
    entry point reaches (``source``)."""

    def __init__(self, plan: Plan, title: str):
        self.plan, self.title = plan, title
        self.lp = plan.levels
        self.ids = StepNames(plan.subtree)
        self.units: list[Unit] = []
        self.tasked = sorted({n for n in plan.subtree if self.lp[n].tasks} |  # vmap draws their random numbers
                             {u for u in plan.subtree if any(self.lp[c].tasks for c in plan.lowers[u])})
        # the step draws seeds when a level outside the tasks' vmap may draw random numbers
        self.seeds = any(self.lp[n].random is not False for n in plan.subtree if n not in self.tasked)

    def add(self, defines, lines):
        self.units.append(Unit(tuple(defines), lines + [""]))

    # -- pieces ---------------------------------------------------------------------------------
    def update_index(self, name, k="k"):
        """The expression of the index of level ``name``'s update ``k`` of its block ``i``."""
        steps = self.lp[name].steps
        return "i" if steps == 1 else (f"i * {steps} + {k}" if k != "0" else f"i * {steps}")

    def batch(self, name, k="k"):
        """The expression of level ``name``'s batch at update ``i * steps + k`` of its block."""
        return f"B[{name!r}][{self.update_index(name, k)}]"

    def seeded(self, indent):
        if not self.seeds:
            return []
        return [f"{indent}B = rt.seeded(state, B, {self.tasked!r})"
                "  # a seed per update whose loss draws random numbers"]

    def partials(self, name, params, batch, log):
        lp, f = self.lp[name], self.ids[name]
        if lp.compiled:
            return f"{f.partials}({params}, {batch}, {log})"
        return f"rt.partials({name!r}, {params}, {batch}, {lp.wrt!r}, {log})"

    # -- definitions ----------------------------------------------------------------------------
    def partials_unit(self, name):
        if not self.lp[name].compiled:
            return
        f = self.ids[name]
        self.add([f.partials], [
            f"    {f.partials} = rt.region({name!r}, 'partial gradients', lambda params, batch, log: rt.partials(",
            f"        {name!r}, params, batch, {self.lp[name].wrt!r}, log), trailing=1)"])

    def update_units(self, name):
        """A level with no lower levels: one update from its batch (a compiled region under
        compile=True, with its VJP and the compiled loop of its updates where they are used), and
        ``advance_X``, the update as the block and the methods that replay it call it."""
        f, lp = self.ids[name], self.lp[name]
        lines = [f"    def {f.update}(sub, up, batch, log):",
                 f'        """One update of {name!r} from its batch: (new state, loss, metrics, gradient norm)."""',
                 f"        loss, metrics, g = rt.gradient({name!r}, {{**up, **rt.params_of(sub)}}, batch, log)",
                 f"        return rt.apply_update({name!r}, sub, up, g, batch), loss, metrics, rt.grad_norm(g)"]
        defines = [f.update]
        if lp.compiled:
            if lp.keep:
                lines.append(f"    {f.update_vjp} = rt.update_vjp({name!r}, {f.update})")
                defines.append(f.update_vjp)
            if lp.loop:
                lines.append(f"    {f.loop} = rt.update_loop({name!r}, {f.update})")
                defines.append(f.loop)
            lines.append(f"    {f.update} = rt.region({name!r}, 'update', {f.update}, trailing=1)")
        self.add(defines, lines)
        self.add([f.advance], [
            f"    def {f.advance}(sub, up, i, log, B):",
            f'        """One update of {name!r}: a pure function of the block state."""',
            f"        sub, loss, metrics, norm = {f.update}(sub, up, B[{name!r}][i], log)",
            f"        rt.record(log, {name!r}, loss, metrics, norm)",
            "        return sub"])

    def advance_unit(self, name):
        f = self.ids[name]
        extra = ", shared" if name in self.plan.outside else ""
        self.add([f.advance], [
            f"    def {f.advance}(sub, up, i, log, B{extra}):",
            f'        """One update of {name!r}: a pure function of the block state."""',
            f"        {f.g}, sub, loss, metrics = {f.gradient}(sub, up, i, log, B{extra})",
            f"        rt.record(log, {name!r}, loss, metrics, rt.grad_norm({f.g}))",
            f"        return rt.apply_update({name!r}, sub, up, {f.g}, B[{name!r}][i])"])

    def block_unit(self, name):
        """X's loop. A method whose VJP is its own source (``inline``) needs the block's end alone:
        the block returns ``(final state, parameters outside it)``. Any other method gets the
        block's record (``rt.block``): its start, the iterates it keeps, the replayable update."""
        f, lp, plan = self.ids[name], self.lp[name], self.plan
        steps, subtree = lp.steps, list(plan.subtree[name])
        leaf = not plan.lowers[name]
        arg = ", shared" if name in plan.outside else ""
        what = (f"on the tape: {lp.method!r} differentiates its updates by one backward pass" if lp.inline and lp.tape
                else f"{lp.method!r} differentiates its end" if lp.inline else
                f"keeping what {lp.method!r} needs" if lp.toward else "no level differentiates it")
        lines = [f"    def {f.block}(state, up, i, log, B{arg}):",
                 f'        """{steps} update(s) of {name!r} from `state` ({what})."""',
                 f"        s = rt.restrict(state, {subtree!r})",
                 f"        {f.up} = rt.outside(state, up, {subtree!r})"]
        tape = lp.tape and lp.nested  # recorded where this run of the block allows it
        if lp.tape:
            always = "" if lp.nested else ", always=True"
            lines.append(f"        {f.up}, tape = rt.tape({name!r}, s, {f.up}, {list(lp.toward)!r}{always})")
        if lp.start is not None:
            lines += ["        s0 = s", f"        s = rt.begin({name!r}, s0, {f.up})"]
        record = not lp.inline and bool(lp.toward)
        taped = lp.inline and lp.tape  # Unroll's VJP is one backward over this tape: nothing else to keep
        if record:
            lines.append("        start = s")
        keep = lp.keep and record
        if keep:
            lines.append("        path = {0: s} if tape is None else None" if tape else "        path = {0: s}")
        batches = leaf and record  # a level with no lower levels: its batches go to the record
        if batches:
            lines.append(f"        batches = [{self.batch(name)} for k in range({steps})]")
        body = "            "
        loop = lp.loop
        if loop:
            lines += [f"        looped = rt.run_loop({f.loop}, s, {f.up}, "
                      f"{'batches' if batches else f'[{self.batch(name)} for k in range({steps})]'}, "
                      f"{'path is not None' if tape else 'True' if keep else 'False'}, log)",
                      "        if looped is not None:",
                      "            s, path = looped" if keep else "            s, _ = looped",
                      "        else:"]
            body += "    "
        head = body[:-4]
        if lp.tape:
            lines.append(f"{head}with rt.recording(tape):")
            head, body = body, body + "    "
        index = self.update_index(name)
        if lp.checked_at_end:  # the update written out, its gradient checked with the block's end
            lines += self.checked_loop(name, head, body)
        elif leaf and not record:  # nothing replays the updates: the update itself, in the loop
            lines += [f"{head}for k in range({steps}):",
                      f"{body}s, loss, metrics, norm = {f.update}(s, {f.up}, {self.batch(name)}, log)",
                      f"{body}rt.record(log, {name!r}, loss, metrics, norm)"]
        else:
            lines += [f"{head}for k in range({steps}):", f"{body}s = {f.advance}(s, {f.up}, {index}, log, B{arg})"]
        if keep:
            when = "" if lp.keep == 1 else f"(k + 1) % {lp.keep} == 0 or k == {steps - 1}"
            cond = " and ".join(c for c in ("path is not None" if tape else "", when) if c)
            if cond:
                lines += [f"{body}if {cond}:", f"{body}    path[k + 1] = s"]
            else:
                lines.append(f"{body}path[k + 1] = s")
        if taped:
            self.add([f.block], lines + ["        return rt.untaped(s, tape), (s, tape)"])
            return
        if not record:
            self.add([f.block], lines + [f"        return s, {f.up}"])
            return
        advance = f"lambda s_, up_, k: {f.advance}(s_, up_, {index}, None, B{arg})"
        extras = [f"begin=lambda up_: rt.begin({name!r}, s0, up_)"] if lp.start is not None else []
        extras.append("log=log")
        if leaf and lp.keep and lp.compiled:
            extras.append(f"update_vjp=lambda s_, up_, upper, k, ct: {f.update_vjp}(s_, up_, upper, "
                          f"{self.batch(name)}, ct)")
        if lp.tape:
            extras.append("tape=tape")
        if loop:
            extras.append(f"loop={f.loop}")
        if batches:
            extras.append("batches=batches")
        lines += [f"        record = rt.block({name!r}, {steps}, start, s, {'path' if keep else 'None'}, {f.up},",
                  f"                          {advance},",
                  f"                          {self.batch(name, str(steps - 1))}, {', '.join(extras)})",
                  f"        return {'rt.untaped(s, tape)' if lp.tape else 's'}, record"]
        self.add([f.block], lines)

    def checked_loop(self, name, head, body) -> list:
        """The updates of a block whose gradients its end checks (``LevelPlan.checked_at_end``): each
        update's gradient and optimizer step, its loss kept; then one record of the block."""
        up, lp = self.ids[name].up, self.lp[name]
        lines = [f"{head}losses = []",
                 f"{head}for k in range({lp.steps}):",
                 f"{body}batch = {self.batch(name)}",
                 f"{body}loss, metrics, g = rt.gradient({name!r}, {{**{up}, {name!r}: s[{name!r}]['params']}}, "
                 "batch, log)"]
        if lp.counted_at_end:
            lines += [f"{body}s = rt.apply_uncounted({name!r}, s, {up}, g)",
                      f"{body}losses.append(loss)",
                      f"{head}s = rt.count(s, {name!r}, {lp.steps})  # once per block: its updates do not "
                      "read the count"]
        else:
            lines += [f"{body}s = rt.apply_update({name!r}, s, {up}, g, batch)",
                      f"{body}losses.append(loss)"]
        return lines + [f"{head}rt.record_block(log, {name!r}, losses, metrics, g, s)"
                        "  # a non-finite gradient would leave non-finite parameters: checked once, at the end"]

    def products(self, name) -> bool:
        """Whether the lower level's VJP is its method's own source on the block's end (the block
        returns its final state and the parameters outside it)."""
        return self.lp[name].inline and not self.lp[name].tape

    def vjp_units(self, name):
        """The lower level ``name``'s VJP toward each upper, as its method's own source."""
        lp = self.lp[name]
        if not self.products(name):
            return
        me = f"method[{name!r}]"
        body = forward_mode.planned(lp.method, lp.afresh).source(me)  # with the build's low_memory
        for upper in lp.toward:
            fn = self.ids.vjp(name, upper, len(lp.toward) == 1)
            lines = [f"    def {fn}(final, up, batch, v):",
                     f'        """vᵀ dθ_{name}/dθ_{upper} by {lp.method!r} at the end of the block of {name!r}, '
                     f'and its diagnostics; L = {name}\'s loss on its last batch, θ = its parameters there."""',
                     f"        solution, info = rt.solution({name!r}, {upper!r}, final, up, batch)"]
            *body_lines, last = body
            if not last.startswith("return "):
                raise ValueError(f"{lp.method!r}.source() must end with `return <the VJP>`, got {last!r}")
            code, _, comment = last.partition("  # ")
            lines += [f"        {line}" for line in body_lines]
            lines.append(f"        {code}, info" + (f"  # {comment}" if comment else ""))
            if lp.compiled:  # one compiled region from plain tensors; its diagnostics come back as outputs
                lines.append(f"    {fn} = rt.products_region({name!r}, {upper!r}, {fn})")
            self.add([fn], lines)

    def hypergradient_terms(self, name, blocks, shared=False, read=()) -> list:
        """The lines adding X's hypergradient through each block in ``blocks`` to its gradient.
        A method that ``consumes_cotangent`` is handed its level's cotangent (``handover.take``: it
        may drop it or reuse its buffers) unless ``read`` (the levels whose cotangents another term
        reads too) names it, or its products run as a compiled region."""
        f, plan, wrt = self.ids[name], self.plan, self.lp[name].wrt
        out = []
        for c in blocks:
            lc = self.lp[c]
            handed = lc.method.consumes_cotangent and c not in read and not lc.compiled
            cot = "{" + ", ".join(f"{n!r}: handover.take(g, {n!r})" if handed and n == c else f"{n!r}: g[{n!r}]"
                                  for n in plan.subtree[c] if n in wrt[1:]) + "}"
            record = f"shared[{c!r}]" if shared else self.ids[c].record
            if lc.inline and lc.tape:
                out.append(f"        {f.g} = rt.add({f.g}, rt.tape_vjp({record}, {name!r}, {cot}))"
                           f"  # {lc.method!r}: one backward pass over the tape of {c}'s updates")
            elif lc.inline:
                fn = self.ids.vjp(c, name, len(lc.toward) == 1)
                final, up = (f"{record}[0]", f"{record}[1]") if shared else (self.ids[c].sub, self.ids[c].up)
                v = f"handover.take(g, {c!r})" if handed else f"g[{c!r}]"
                out += [f"        ct, info = {fn}({final}, {up}, {self.batch(c, k=str(lc.steps - 1))}, {v})",
                        f"        rt.report_info(log, {c!r}, info)",
                        f"        {f.g} = rt.add({f.g}, ct)"]
            else:
                out.append(f"        {f.g} = rt.add({f.g}, rt.best_response_vjp({c!r}, {name!r}, {record}, {cot}))")
        return out

    def gradient_unit(self, name, suffix=False):
        f, plan = self.ids[name], self.plan
        outside, group = plan.outside.get(name, ()), plan.groups.get(name, ())
        kids = [c for c in plan.children[name] if c not in group]  # lower levels, each differentiated by its method
        sig = "sub, up, i, log, B" + (", shared" if outside else "")
        fn = f.one_task if suffix else f.gradient
        lines = [f"    def {fn}({sig}):",
                 f'        """Total gradient of {name!r} at its update i (its lower levels run first)."""']
        if group:
            lines += ["        start = sub", f"        sub = {f.group}(sub, up, i, log, B)"]
        for c in kids:
            fc = self.ids[c]
            final, record = (fc.sub, fc.up) if self.products(c) else ("s", fc.record)
            lines += [f"        {final}, {record} = {fc.block}(sub, up, i, log, B)",
                      f"        sub = {{**sub, **{final}}}"]
        partials = self.partials(name, "{**up, **rt.params_of(sub)}", f"B[{name!r}][i]", "log")
        lines += [f"        loss, metrics, g = {partials}",
                  f"        {f.g} = g[{name!r}]"]
        # a cotangent is handed over only to the one term that reads it: the levels read by two terms
        # (a level below two blocks) or by a group's VJP stay in g
        terms = [[b] if self.products(b) else list(plan.subtree[b]) for b in [*kids, *outside]]
        read = {n for b in group for n in plan.subtree[b]}
        read |= {n for t in terms for n in t if sum(n in u for u in terms) > 1}
        lines += self.hypergradient_terms(name, kids, read=read)
        lines += self.hypergradient_terms(name, outside, shared=True, read=read)
        if group:
            cot = "{" + ", ".join(f"{n!r}: g[{n!r}]" for b in group for n in plan.subtree[b]
                                  if n in self.lp[name].wrt[1:]) + "}"
            lines.append(f"        {f.g} = rt.add({f.g}, rt.group_vjp({name!r}, "
                         f"lambda s_: {f.group}(s_, up, i, None, B), "
                         f"start, {cot}))")
        self.add([fn], lines + [f"        return {f.g}, sub, loss, metrics"])

    def group_unit(self, name):
        """The blocks of X's update that share a level: the shared ones first, then their uppers'."""
        f, group, plan = self.ids[name], self.plan.groups[name], self.plan
        lines = [f"    def {f.group}(sub, up, i, log, B):",
                 f'        """The blocks of {" + ".join(group)} in update i of {name!r}: pure in the block state."""',
                 "        shared = {}"]
        for c in group:
            record = f"shared[{c!r}]" if c in plan.hosts else "_"
            final = self.ids[c].sub if self.products(c) else "s"
            arg = ", shared" if c in plan.outside else ""
            lines += [f"        {final}, {record} = {self.ids[c].block}(sub, up, i, log, B{arg})",
                      f"        sub = {{**sub, **{final}}}"]
            if c in plan.hosts and self.products(c):
                lines.append(f"        shared[{c!r}] = ({final}, shared[{c!r}])")
        self.add([f.group], lines + ["        return sub"])

    def tasks_unit(self, name, tasked, taped):
        """The upper level of a level batched over tasks: its gradient, vmapped over the tasks,
        averaged. ``taped``: where ``rt.tape_tasks`` allows, the tasks' mean loss is computed under
        ``vmap`` on the autograd tape and differentiated by one backward pass (as a hand-written
        MAML does)."""
        f, t = self.ids[name], self.ids[tasked]
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
                f"                rt.restrict(sub, [{tasked!r}]), "
                f"{{{tasked!r}: B[{tasked!r}], {name!r}: B[{name!r}]}})",
                "            g = rt.tape_gradient(loss.mean(), leaves)",
                f"            return g, {{**sub, **rt.untaped({t.sub}, leaves)}}, loss.mean().detach(), {{}}"]
        self.add([f.gradient], lines + [
            "        def one_task(sub_task, B_task):",
            "            task_log = rt.task_log()",
            f"            g, s, loss, _ = {f.one_task}({{**sub, **sub_task}}, up, i, task_log, {{**B, **B_task}})",
            f"            return g, rt.restrict(s, [{tasked!r}]), loss, rt.task_outcome(task_log)",
            f"        g, {t.sub}, loss, outcomes = vmap(one_task, randomness='different')(",
            f"            rt.restrict(sub, [{tasked!r}]), {{{tasked!r}: B[{tasked!r}], {name!r}: B[{name!r}]}})",
            "        rt.merge_task_outcomes(log, outcomes)",
            f"        return rt.mean_over_tasks(g), {{**sub, **{t.sub}}}, loss.mean(), {{}}"])

    def step_unit(self):
        plan, ids = self.plan, self.ids
        shared = [c for c in plan.children[None] if c in plan.hosts]  # blocks step() runs before the tops
        tops = [c for c in plan.children[None] if c not in plan.hosts]
        lines = ["    def step(state, B):",
                 f'        """One step of {self.title}: (state, batches) -> (new state, log)."""',
                 "        log = rt.new_log()"] + self.seeded("        ")
        lines += self.shared_blocks(shared, "        ")
        for t in tops:
            subtree = list(plan.subtree[t])
            arg = ", shared" * (t in plan.outside)
            call = (f"{ids[t].advance}(rt.restrict(state, {subtree!r}), rt.outside(state, {{}}, {subtree!r}), "
                    f"{'t' if self.lp[t].steps > 1 else '0'}, log, B{arg})")
            if self.lp[t].steps > 1:
                lines += [f"        for t in range({self.lp[t].steps}):", f"            state = {{**state, **{call}}}"]
            else:
                lines.append(f"        state = {{**state, **{call}}}")
        self.add(["step"], lines + ["        return state, log"])

    def shared_blocks(self, shared, indent) -> list:
        if not shared:
            return []
        lines = [f"{indent}shared = {{}}"]
        for n in shared:
            arg = ", shared" * (n in self.plan.outside)
            final = self.ids[n].sub if self.products(n) else "s"
            lines += [f"{indent}{final}, shared[{n!r}] = {self.ids[n].block}(state, {{}}, 0, log, B{arg})",
                      f"{indent}state = {{**state, **{final}}}"]
            if self.products(n):
                lines.append(f"{indent}shared[{n!r}] = ({final}, shared[{n!r}])")
        return lines

    def hypergradient_unit(self):
        lines = ["    def hypergradient(name, state, B, log=None):",
                 '        """(total gradient, loss) of level `name` at its next update, after the shared blocks it',
                 '        reads (which run first, as in the step); changes nothing."""'] + self.seeded("        ")
        for name in self.plan.subtree:
            sub = list(self.plan.subtree[name])
            lines.append(f"        if name == {name!r}:")
            lines += self.shared_blocks(_shared_before(name, self.plan), "            ")
            lines.append(f"            return {self.ids[name].gradient}(rt.restrict(state, {sub!r}), "
                         f"rt.outside(state, {{}}, {sub!r}), 0, log, B{', shared' * (name in self.plan.outside)})[::2]")
        self.add(["hypergradient"], lines + ["        raise KeyError(name)"])

    # -- the program ----------------------------------------------------------------------------
    def units_of_program(self):
        plan, lp = self.plan, self.lp
        tops = [c for c in plan.children[None] if c not in plan.hosts]
        for name in plan.subtree:
            lowers = plan.lowers[name]
            if name not in tops:
                self.block_unit(name)
                self.vjp_units(name)
            task_lowers = [c for c in lowers if lp[c].tasks]
            self.partials_unit(name)
            if name in plan.groups:
                self.group_unit(name)
            self.gradient_unit(name, suffix=bool(task_lowers))
            if task_lowers:
                tasked = task_lowers[0]
                taped = (list(lowers) == task_lowers[:1] and not plan.lowers[tasked]
                         and lp[tasked].method.records_tape)
                self.tasks_unit(name, tasked, taped)
            if not lowers:
                self.update_units(name)
            else:
                self.advance_unit(name)
        self.step_unit()
        self.hypergradient_unit()

    def source(self, entry: str) -> str:
        """The definitions ``entry`` reaches, in the order they were written, as the source of
        ``make_<entry>(rt)``."""
        defined = {n: u for u in self.units for n in u.defines}
        reached, pending = set(), [defined[entry]]
        while pending:
            unit = pending.pop()
            if id(unit) in reached:
                continue
            reached.add(id(unit))
            pending += [defined[w] for w in _names_used(unit.lines) if w in defined and defined[w] is not unit]
        body = [line for u in self.units if id(u) in reached for line in u.lines]
        text = "\n".join(body)
        used = [m for m in _METHOD_MODULES if re.search(rf"\b{m}\.", text)]
        head = [f"# The {'fused step' if entry == 'step' else 'hypergradient entry point'} of {self.title}, "
                f"generated by mlodsl from its plan (print(prog.plan)).",
                "# State: {level: {'params': {...}, 'opt': {...}}}; B: {level: [its batch for each update]}.",
                ""]
        if used:
            head.append(f"from mlodsl.hypergrad import {', '.join(used)}")
        if "vmap(" in text:
            head.append("from torch.func import vmap")
        if len(head) > 3:
            head.append("")
        binds = ["    method = rt.methods", ""] if re.search(r"\bmethod\[", text) else []
        return "\n".join(head + ["", f"def make_{entry}(rt):"] + binds + body + [f"    return {entry}", ""])


def _names_used(lines) -> set:
    """The identifiers a unit's code uses (not those in its strings and comments)."""
    tokens = tokenize.generate_tokens(io.StringIO(textwrap.dedent("\n".join(lines)) + "\n").readline)
    return {tok.string for tok in tokens if tok.type == tokenize.NAME}


def generate(plan: Plan, title: str, entry: str = "step") -> str:
    """The source of ``make_step(rt) -> step`` (``entry="hypergradient"``: of
    ``make_hypergradient(rt) -> hypergradient``) for ``plan``, whose ``levels`` hold the decisions
    (``plan.decide``)."""
    writer = _Writer(plan, title)
    writer.units_of_program()
    return writer.source(entry)


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


def build(source: str, runtime, entry: str = "step"):
    """Execute the generated source from a file of its own (named by its hash, in the temporary
    directory), so that tracebacks and debuggers show the real lines of the step; returns
    ``(make_<entry>(runtime), filename)``."""
    digest = hashlib.sha1(source.encode()).hexdigest()[:16]
    folder = os.path.join(tempfile.gettempdir(), "mlodsl-steps")
    os.makedirs(folder, exist_ok=True)
    filename = os.path.join(folder, f"{entry}_{digest}.py")
    if not os.path.exists(filename):
        tmp = f"{filename}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            f.write(source)
        os.replace(tmp, filename)
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {"__file__": filename}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[f"make_{entry}"](runtime), filename
