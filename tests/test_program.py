"""Programs of several shapes against hand-written nested autograd (float64), and the schedule."""
import torch

import mlodsl as ml
from helpers import DT

D = 4


def data(seed, n=12):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, D, generator=g, dtype=DT)
    return X, X @ torch.randn(D, generator=g, dtype=DT) + 0.1 * torch.randn(n, generator=g, dtype=DT)


Xa, ya = data(1)
Xb, yb = data(2)
Xc, yc = data(3)
LR_C, LR_B, LR_A = 0.05, 0.1, 0.2


def loss_c(w, u, a):
    return ((Xc @ w - yc) ** 2).mean() + (u.exp() * w ** 2).sum() + 0.1 * (a * w).sum()


def loss_b(u, w, a):
    return ((Xb @ w - yb) ** 2).mean() + 0.1 * ((u - a) ** 2).sum()


def loss_a(a, w, u):
    return ((Xa @ w - ya) ** 2).mean() + 0.01 * (u ** 2).sum()


def three_levels(steps_b=2, steps_c=3, method_b=None, method_c=None):
    C = ml.Hyper(w=torch.linspace(-0.5, 0.5, D, dtype=DT))
    B = ml.Hyper(u=torch.full((D,), -1.0, dtype=DT))
    A = ml.Hyper(a=torch.linspace(0.1, 0.4, D, dtype=DT))

    @ml.level(C, optimizer=ml.optim.sgd(lr=LR_C), steps=steps_c, hypergrad=method_c)
    def clf(c, data_w, hyper):
        return loss_c(c.w, data_w.u, hyper.a)

    @ml.level(B, optimizer=ml.optim.sgd(lr=LR_B), steps=steps_b, depends_on=[clf], hypergrad=method_b)
    def data_w(b, clf, hyper):
        return loss_b(b.u, clf.w, hyper.a)

    @ml.level(A, optimizer=ml.optim.sgd(lr=LR_A), depends_on=[data_w])
    def hyper(a, data_w, clf):
        return loss_a(a.a, clf.w, data_w.u)

    return ml.Program(hyper), A, B, C


def nested_reference(A, B, C, steps_b=2, steps_c=3):
    """Hand-written nested differentiation (torch.func.grad) of one step of the top level.

    Each update of the middle level takes the total derivative of its loss through the bottom
    level's updates *in that update*; the bottom state it starts from is carried between updates.
    Checked against a central finite difference of the same computation (agrees to 1e-10).
    """
    from torch.func import grad

    def bottom(w, u, a):
        for _ in range(steps_c):
            w = w - LR_C * grad(loss_c)(w, u, a)
        return w

    def top_loss(a):
        u, w = B.u.detach(), C.w.detach()
        for _ in range(steps_b):
            w_start = w
            gu = grad(lambda u_: loss_b(u_, bottom(w_start, u_, a), a))(u)
            w = bottom(w_start, u, a)
            u = u - LR_B * gu
        return loss_a(a, w, u), (u, w)

    ga, (u, w) = grad(top_loss, has_aux=True)(A.a.detach())
    return ga, u, w


def test_three_levels_unrolled_everywhere_equal_nested_autograd():
    prog, A, B, C = three_levels()
    expected, u, w = nested_reference(A, B, C)
    torch.testing.assert_close(prog.hypergradient("hyper")["a"], expected, rtol=1e-9, atol=1e-12)
    a0 = A.a.detach().clone()
    prog.step()
    torch.testing.assert_close(prog.params("hyper")["a"], a0 - LR_A * expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(prog.params("data_w")["u"], u, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(prog.params("clf")["w"], w, rtol=1e-9, atol=1e-12)


def test_three_levels_forward_mode_in_the_middle_equals_unroll():
    prog, A, B, C = three_levels(method_b=ml.hypergrad.Forward())
    expected, _, _ = nested_reference(A, B, C)
    torch.testing.assert_close(prog.hypergradient("hyper")["a"], expected, rtol=1e-9, atol=1e-12)


def test_middle_level_hypergradient_through_its_lower_level():
    prog, A, B, C = three_levels()
    a = A.a.detach()
    u = B.u.detach().clone().requires_grad_()
    w = C.w.detach().clone().requires_grad_()
    for _ in range(3):
        (gw,) = torch.autograd.grad(loss_c(w, u, a), w, create_graph=True)
        w = w - LR_C * gw
    (expected,) = torch.autograd.grad(loss_b(u, w, a), u)
    torch.testing.assert_close(prog.hypergradient("data_w")["u"], expected, rtol=1e-9, atol=1e-12)


def _two_lowers_program():
    P = ml.Hyper(p=torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=DT))
    L1 = ml.Hyper(w=torch.zeros(D, dtype=DT))
    L2 = ml.Hyper(v=torch.ones(D, dtype=DT))

    @ml.level(L1, optimizer=ml.optim.sgd(lr=0.1), steps=3)
    def first(m, top):
        return ((Xc @ m.w - yc) ** 2).mean() + (top.p.exp() * m.w ** 2).sum()

    @ml.level(L2, optimizer=ml.optim.sgd(lr=0.05), steps=2)
    def second(m, top):
        return ((Xb @ m.v - yb) ** 2).mean() + ((m.v - top.p) ** 2).sum()

    @ml.level(P, optimizer=ml.optim.sgd(lr=0.1), depends_on=[first, second])
    def top(m, first, second):
        return ((Xa @ (first.w + second.v) - ya) ** 2).mean()

    return ml.Program(top), P, L1, L2


def test_two_lower_levels_under_one_upper():
    prog, P, L1, L2 = _two_lowers_program()
    p = P.p.detach().clone().requires_grad_()
    w, v = L1.w.detach().clone().requires_grad_(), L2.v.detach().clone().requires_grad_()
    for _ in range(3):
        (g,) = torch.autograd.grad(((Xc @ w - yc) ** 2).mean() + (p.exp() * w ** 2).sum(), w, create_graph=True)
        w = w - 0.1 * g
    for _ in range(2):
        (g,) = torch.autograd.grad(((Xb @ v - yb) ** 2).mean() + ((v - p) ** 2).sum(), v, create_graph=True)
        v = v - 0.05 * g
    (expected,) = torch.autograd.grad(((Xa @ (w + v) - ya) ** 2).mean(), p)
    torch.testing.assert_close(prog.hypergradient("top")["p"], expected, rtol=1e-9, atol=1e-12)
    assert str(prog.schedule).count("repeat") == 3


def test_one_lower_level_under_two_uppers_shares_one_trajectory():
    T1 = ml.Hyper(s=torch.tensor([0.2, 0.1, -0.1, 0.0], dtype=DT))
    T2 = ml.Hyper(r=torch.tensor(0.5, dtype=DT))
    L = ml.Hyper(w=torch.zeros(D, dtype=DT))
    calls = []

    def batch():
        calls.append(1)
        return Xc, yc

    @ml.level(L, optimizer=ml.optim.sgd(lr=0.1), steps=4, data=batch)
    def shared(m, batch, up1, up2):
        x, y = batch
        return ((x @ m.w - y) ** 2).mean() + up2.r.exp() * ((m.w - up1.s) ** 2).sum()

    @ml.level(T1, optimizer=ml.optim.sgd(lr=0.1), depends_on=[shared])
    def up1(m, shared):
        return ((Xa @ shared.w - ya) ** 2).mean()

    @ml.level(T2, optimizer=ml.optim.sgd(lr=0.1), depends_on=["shared"])
    def up2(m, shared):
        return ((Xb @ shared.w - yb) ** 2).mean() + m.r ** 2

    prog = ml.Program(up1, up2)
    assert len(calls) == 4  # the first step's batches, drawn at build time (tracing needs one)
    s, r = T1.s.detach().clone().requires_grad_(), T2.r.detach().clone().requires_grad_()
    w = L.w.detach().clone().requires_grad_()
    for _ in range(4):
        (g,) = torch.autograd.grad(((Xc @ w - yc) ** 2).mean() + r.exp() * ((w - s) ** 2).sum(), w, create_graph=True)
        w = w - 0.1 * g
    (g1,) = torch.autograd.grad(((Xa @ w - ya) ** 2).mean(), s, retain_graph=True)
    (g2,) = torch.autograd.grad(((Xb @ w - yb) ** 2).mean() + r ** 2, r)
    torch.testing.assert_close(prog.hypergradient("up1")["s"], g1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(prog.hypergradient("up2")["r"], g2, rtol=1e-9, atol=1e-12)
    s0, r0 = T1.s.detach().clone(), T2.r.detach().clone()
    prog.step()
    # The same 4 batches served both hypergradients and the step: the shared level ran once.
    assert len(calls) == 4
    torch.testing.assert_close(prog.params("up1")["s"], s0 - 0.1 * g1, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(prog.params("up2")["r"], r0 - 0.1 * g2, rtol=1e-9, atol=1e-12)
    prog.step()
    assert len(calls) == 8


def counting_sgd(lr, counter, name):
    """A user-defined optimizer: the documented init/update/reads interface, nothing more."""
    base = ml.optim.sgd(lr=lr)

    class Counting:
        reads = ()

        def init(self, params):
            return base.init(params)

        def update(self, params, grads, state, reads=None):
            counter[name] = counter.get(name, 0) + 1
            return base.update(params, grads, state, reads)

    return Counting()


def test_inner_step_counts_are_exactly_as_planned():
    counter, drawn = {}, {}

    def source(name):
        def draw():
            drawn[name] = drawn.get(name, 0) + 1
            return Xc, yc
        return draw

    mods = {n: ml.Hyper(w=torch.zeros(D, dtype=DT)) for n in "abc"}

    @ml.level(mods["c"], optimizer=counting_sgd(0.1, counter, "c"), data=source("c"), steps=4,
              hypergrad=ml.hypergrad.FirstOrder())
    def c(m, batch, b):
        x, y = batch
        return ((x @ (m.w + b.w) - y) ** 2).mean()

    @ml.level(mods["b"], optimizer=counting_sgd(0.1, counter, "b"), data=source("b"), steps=3,
              depends_on=[c], hypergrad=ml.hypergrad.FirstOrder())
    def b(m, batch, c, a):
        x, y = batch
        return ((x @ (m.w + c.w + a.w) - y) ** 2).mean()

    @ml.level(mods["a"], optimizer=counting_sgd(0.1, counter, "a"), data=source("a"), steps=2, depends_on=[b])
    def a(m, batch, b):
        x, y = batch
        return ((x @ (m.w + b.w) - y) ** 2).mean()

    prog = ml.Program(a)
    assert prog.plan.updates_per_step == {"a": 2, "b": 6, "c": 24}
    assert drawn == {"a": 2, "b": 6, "c": 24}  # the first step's batches, drawn at build time
    prog.step()
    prog.step()
    assert counter == {"a": 4, "b": 12, "c": 48}
    assert drawn == {"a": 4, "b": 12, "c": 48}
    lines = [op for op in prog.schedule]
    assert [(op.action, op.level, op.depth) for op in lines] == [
        ("repeat", "a", 0), ("repeat", "b", 1), ("repeat", "c", 2), ("update", "c", 3),
        ("hypergradient", "b", 2), ("update", "b", 2), ("hypergradient", "a", 1), ("update", "a", 1)]


def test_graph_nodes_and_edges():
    prog, *_ = three_levels()
    g = prog.graph
    kinds = sorted((u, v, k) for u, v, k in g.edges(data="kind"))
    assert kinds == [("clf", "data_w", "reads"), ("clf", "hyper", "reads"), ("data_w", "clf", "depends_on"),
                     ("data_w", "hyper", "reads"), ("hyper", "clf", "reads"), ("hyper", "data_w", "depends_on")]
    assert g.nodes["clf"]["params"] == D and g.nodes["data_w"]["steps"] == 2
    assert g.nodes["clf"]["method"] == "Unroll()" and g.nodes["hyper"]["method"] is None
    text = str(prog.show())
    assert "hyper" in text and "└─ data_w" in text and "reads" in text
