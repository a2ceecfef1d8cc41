"""What a user inspects is what runs: traced graphs, generated code, schedule, checkpoints."""
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import mlodsl as ml
from helpers import DT, make_hpo


def test_level_graph_has_named_placeholders_and_readable_code():
    prog, *_ = make_hpo(K=2)
    gm = prog.levels["inner"].graph
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["batch_0", "batch_1", "inner_weight", "inner_bias", "outer_log_l2"]
    assert "def forward(self, batch_0, batch_1, inner_weight, inner_bias, outer_log_l2)" in gm.code
    assert "linear" in gm.code and "exp" in gm.code
    assert not any(n.op == "get_attr" for n in gm.graph.nodes)  # parameters are inputs, not attributes


def _lines_run(prog, run) -> list:
    """The lines of the generated step that ``run()`` executes, in the order they first ran."""
    lines = prog.code.splitlines()
    executed = {}

    def tracer(frame, event, arg):
        if frame.f_code.co_filename == prog.code_filename:
            executed.setdefault(frame.f_lineno, len(executed))
            return tracer
        return None

    sys.settrace(tracer)
    try:
        run()
    finally:
        sys.settrace(None)
    return [lines[n - 1].strip() for n in sorted(executed, key=executed.get)]


def _code_lines(source: str) -> list:
    """The lines of ``source`` that are code: no blank lines, comments or docstrings."""
    import ast
    tree = ast.parse(source)
    docs = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.Module)) and ast.get_docstring(node) is not None:
            first = node.body[0]
            docs |= set(range(first.lineno, first.end_lineno + 1))
    return [line for n, line in enumerate(source.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#") and n not in docs]


def test_generated_code_is_the_code_that_runs_and_holds_nothing_that_does_not():
    """Every line of the step's source runs in a step (no dead branch or function), and the step
    is the same file the tracebacks point into."""
    prog, *_ = make_hpo(K=3)
    ran = set(_lines_run(prog, prog.step))
    code = {line.strip() for line in _code_lines(prog.code)}
    # what never runs is what make_step runs once (its definitions) and the file's header
    never = {line for line in code - ran
             if not line.startswith(("def ", "return step", "from ", "method = rt.methods"))}
    assert not never, never
    assert "for k in range(3):" in code  # the loop over inner updates is a loop, not 3 inlined copies
    assert not any("range(1)" in line or "% 1 " in line for line in code)


def test_generated_cg_step_is_the_math_and_short():
    """CG's step holds its own solve on Hessian-vector products (the method's source), in under
    50 lines of code; the Unroll program's step is a different program."""
    prog, *_ = make_hpo(K=3, method=ml.hypergrad.CG(iters=3))
    ran = _lines_run(prog, prog.step)
    solve = [line for line in ran if "linear.conjugate_gradient(joint_vp, v, iters=3" in line]
    assert solve and any("products.joint_products(solution)" in line for line in ran)
    assert len(_code_lines(prog.code)) <= 50, len(_code_lines(prog.code))
    unroll, *_ = make_hpo(K=3, method=ml.hypergrad.Unroll())
    assert "conjugate_gradient" not in unroll.code and "rt.tape('inner'" in unroll.code
    assert "rt.tape(" not in prog.code and "path" not in prog.code  # nothing CG does not need


def test_a_level_that_cannot_be_traced_falls_back_with_a_warning_and_same_numbers():
    prog, net, hyper, train, val = make_hpo(K=3)
    expected = prog.hypergradient("outer")["log_l2"]

    _, net2, hyper2, _, _ = make_hpo(K=3)

    @ml.level(net2, optimizer=ml.optim.sgd(lr=0.5), data=train, steps=3)
    def inner(net, batch, outer):
        x, y = batch
        logits = net(x).squeeze(-1)
        if logits.sum() > 1e9:  # data-dependent Python control flow: symbolic tracing cannot follow it
            logits = logits * 0
        fit = F.binary_cross_entropy_with_logits(logits, y)
        return fit + (outer.log_l2.exp() * net.weight.squeeze(0) ** 2).sum()

    @ml.level(hyper2, optimizer=ml.optim.sgd(lr=0.1), data=val, depends_on=[inner])
    def outer(hyper, batch, inner):
        x, y = batch
        return F.binary_cross_entropy_with_logits(inner(x).squeeze(-1), y)

    with pytest.warns(ml.TraceWarning, match="level 'inner' could not be traced.*torch.where"):
        prog2 = ml.Program(outer)
    assert prog2.levels["inner"].traced.opaque and not prog2.levels["outer"].traced.opaque
    torch.testing.assert_close(prog2.hypergradient("outer")["log_l2"], expected, rtol=1e-12, atol=1e-14)


def test_schedule_and_diagram_print():
    prog, *_ = make_hpo(K=4)
    text = str(prog.schedule)
    assert text.splitlines()[0] == "repeat 1× outer:"
    assert "  repeat 4× inner:" in text and "hypergradient of outer through inner by Unroll()" in text
    assert "inner" in str(prog.show())
    assert prog.show()._repr_png_()[:4] == b"\x89PNG"  # matplotlib is a test dependency


def test_diagram_has_no_png_without_matplotlib(monkeypatch):
    prog, *_ = make_hpo(K=1)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # its import raises ImportError
    assert prog.show()._repr_png_() is None


def test_fit_records_history_validation_and_callbacks():
    prog, *_ = make_hpo(K=2)
    seen = []
    hist = prog.fit(5, validate=lambda p: {"acc": 0.5}, every=2, progress=False,
                    callbacks=[lambda p, row: seen.append(row["step"]) or row["step"] == 4])
    assert [r["step"] for r in hist] == [1, 2, 3, 4] and seen == [1, 2, 3, 4]
    assert "val/acc" in hist[1] and "val/acc" not in hist[0]
    assert {"inner", "outer", "inner/grad_norm", "outer/grad_norm"} <= hist[0].keys()


def test_metrics_returned_by_a_level_reach_history():
    h = ml.Hyper(w=torch.ones(2, dtype=DT))

    @ml.level(h, optimizer=ml.optim.sgd(lr=0.1))
    def only(m):
        loss = (m.w ** 2).sum()
        return loss, {"norm": m.w.norm()}

    prog = ml.Program(only)
    row = prog.step()
    assert row["only"] == pytest.approx(2.0) and row["only/norm"] == pytest.approx(2 ** 0.5)


RESUME = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import mlodsl as ml
    from helpers import make_hpo
    prog, *_ = make_hpo(K=3, outer_opt=ml.optim.adam(lr=0.05))
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "first":
        for _ in range(3): prog.step()
        prog.save(path)
    else:
        ml.load(path, prog)
        assert prog.step_count == 3
        for _ in range(2): prog.step()
        torch.save({{n: prog.params(n) for n in ("inner", "outer")}}, path + ".out")
""")


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(RESUME.format(tests=str(Path(__file__).parent)))
    ckpt = str(tmp_path / "ckpt.pt")
    for mode in ("first", "second"):
        subprocess.run([sys.executable, str(script), mode, ckpt], check=True)
    prog, *_ = make_hpo(K=3, outer_opt=ml.optim.adam(lr=0.05))
    for _ in range(5):
        prog.step()
    resumed = torch.load(ckpt + ".out")
    for n in ("inner", "outer"):
        for k, v in prog.params(n).items():
            assert torch.equal(v, resumed[n][k]), (n, k)
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary file


def test_errors_point_at_the_users_line_and_the_generated_step(tmp_path):
    """An exception inside a level function shows the user's line; the step's frames show its source."""
    import traceback
    h = ml.Hyper(w=torch.ones(3, dtype=DT))
    calls = [0]

    def data():
        calls[0] += 1
        return torch.ones(3 if calls[0] < 3 else 4, dtype=DT)

    @ml.level(h, optimizer=ml.optim.sgd(lr=0.1), data=data)
    def only(m, batch):
        return (m.w * batch).sum()  # the failing line

    prog = ml.Program(only)
    prog.step()
    prog.step()
    with pytest.raises(RuntimeError) as info:
        prog.step()
    text = "".join(traceback.format_exception(info.value))
    assert "return (m.w * batch).sum()  # the failing line" in text
    assert "level 'only'" in text
    assert "advance_only(" in text  # a frame of the generated step, with its source line
    assert prog.code_filename in text


def test_parameters_read_through_parameters_are_not_frozen_by_tracing():
    """Iterating module.parameters() bypasses fx's proxies; the op that meets them is recorded on the
    parameters themselves (``trace._LiftOutsideTensors``), which become the graph's inputs, so the
    graph is kept and its hypergradient is right (hand-derived)."""
    low, up = ml.Hyper(w=torch.ones(3, dtype=DT)), ml.Hyper(w=torch.zeros(3, dtype=DT))

    @ml.level(low, optimizer=ml.optim.sgd(lr=0.1), steps=2)
    def inner(m, outer):
        return sum(((a - b) ** 2).sum() for a, b in zip(m.parameters(), outer.parameters()))

    @ml.level(up, optimizer=ml.optim.sgd(lr=0.1), depends_on=[inner])
    def outer(m, inner):
        return ((inner.w - 2.0) ** 2).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("error", ml.TraceWarning)
        prog = ml.Program(outer)
    assert not prog.levels["inner"].traced.opaque
    assert {"inner_w", "outer_w"} <= {n.target for n in prog.levels["inner"].graph.graph.nodes if n.op == "placeholder"}
    # w₂ = 0.64 w₀ + 0.36 u, so d/du (w₂ - 2)² = 2 (w₂ - 2) · 0.36 at w₀ = 1, u = 0.
    torch.testing.assert_close(prog.hypergradient("outer")["w"], torch.full((3,), 2 * (0.64 - 2) * 0.36, dtype=DT))
