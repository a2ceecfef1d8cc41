"""Levels that torch.fx.symbolic_trace cannot follow (Hugging Face models, nn.TransformerEncoder)
are captured by make_fx into readable aten graphs (mlodsl.capture): named placeholders, exact
hypergradients, random ops drawn at run time, graphs guarded by the batch's shapes."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import mlodsl as ml
from attention_models import DT, N, bert, encoder, gpt2, hand_cg, hand_unroll, reweighting


@pytest.mark.parametrize("model, ops", [
    (encoder, ["aten.linear", "aten.scaled_dot_product_attention", "aten.layer_norm"]),
    (bert, ["aten.embedding", "aten.linear", "aten.scaled_dot_product_attention", "aten.layer_norm", "aten.tanh"]),
    (gpt2, ["aten.embedding", "aten.addmm", "aten.scaled_dot_product_attention", "aten.layer_norm"]),
], ids=["TransformerEncoder", "BERT", "GPT-2"])
def test_real_model_lower_level_is_a_graph_with_exact_unroll(model, ops):
    net, logits, train, val = model()
    prog, _ = reweighting(net, logits, train, val, ml.hypergrad.Unroll())
    traced = prog.levels["inner"].traced
    assert not traced.opaque and "captured by make_fx" in traced.reason
    code = prog.levels["inner"].graph.code
    for op in ops:
        assert op in code, op
    # The symbolic path's convention: batch leaves, then <level>_<parameter path> for every
    # learnable parameter of every module the function takes.
    placeholders = [n.target for n in traced.graph.graph.nodes if n.op == "placeholder"]
    learnable = [k for k, p in net.named_parameters() if p.requires_grad]
    assert placeholders[:2] == ["batch_0", "batch_1"] and placeholders[2:] == list(traced.inputs)
    assert traced.inputs == {**{"inner_" + k.replace(".", "_"): ("inner", k) for k in learnable},
                             "outer_w": ("outer", "w")}
    expected = hand_unroll(net, logits, train, val)
    torch.testing.assert_close(prog.hypergradient("outer")["w"], expected, rtol=1e-10, atol=1e-12)


def test_peft_lora_on_bert_learns_the_adapters_alone_traced_and_exact():
    from peft import LoraConfig, get_peft_model
    net, logits, train, val = bert()
    lora = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0,
                                          init_lora_weights=False))
    prog, _ = reweighting(lora, logits, train, val, ml.hypergrad.Unroll())
    learned = prog.params("inner")
    assert learned and all("lora_" in k for k in learned) and len(learned) == 2 * 2 * 2  # A, B × q, v × 2 layers
    traced = prog.levels["inner"].traced
    assert not traced.opaque and "aten.scaled_dot_product_attention" in traced.graph.code
    assert sorted(p for lvl, p in traced.inputs.values() if lvl == "inner") == sorted(learned)
    expected = hand_unroll(lora, logits, train, val)
    torch.testing.assert_close(prog.hypergradient("outer")["w"], expected, rtol=1e-10, atol=1e-12)


def _peft_lora(init_lora_weights=True):
    from peft import LoraConfig, get_peft_model
    net, logits, train, val = bert()
    lora = get_peft_model(net, LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], lora_dropout=0.0,
                                          init_lora_weights=init_lora_weights))
    return lora, logits, train, val


def test_cg_on_peft_lora_adapters_refuses_the_saddle_and_damping_gives_the_hand_written_solve():
    """At peft's initialization (lora_B = 0) the adapters' loss is a saddle in (A, B): CG meets
    pᵀHp < 0 and the step raises, naming damping=, with nothing changed. CG(damping=δ) solves
    (H + δI) x = v exactly as hand-written autograd does; δ = 1/(lr·steps) = 5 matches the horizon
    of the two SGD steps, and the damped hypergradient then agrees with Unroll's within 1 %."""
    lora, logits, train, val = _peft_lora()
    prog, hyper = reweighting(lora, logits, train, val, ml.hypergrad.CG(iters=10))
    before = {n: prog.params(n) for n in prog.levels}
    with pytest.raises(ml.hypergrad.DivergenceError, match=r"(?s)level 'inner'.*pᵀHp < 0.*damping="):
        prog.step()
    assert prog.step_count == 0 and all(torch.equal(prog.params(n)[k], v) for n, p in before.items()
                                        for k, v in p.items())

    lora, logits, train, val = _peft_lora()
    frozen = {k: p.detach().clone() for k, p in lora.named_parameters() if not p.requires_grad}
    prog, hyper = reweighting(lora, logits, train, val, ml.hypergrad.CG(iters=10, damping=5.0))
    expected = hand_cg(lora, logits, train, val, 10, damping=5.0)
    got = prog.hypergradient("outer")["w"]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-20)
    unroll = hand_unroll(lora, logits, train, val)
    assert abs(got.norm() / unroll.norm() - 1) < 0.01 and F.cosine_similarity(got, unroll, 0) > 0.999
    with warnings.catch_warnings():
        warnings.simplefilter("error", ml.hypergrad.ConvergenceWarning)
        prog.step()
    assert prog.history[-1]["inner/cg_indefinite"] == 0 and prog.history[-1]["inner/cg_residual"] < 1e-8
    assert not torch.equal(hyper.w.detach(), torch.zeros(N, dtype=DT))  # the step applied the hypergradient
    assert all(torch.equal(p, frozen[k]) for k, p in lora.named_parameters() if not p.requires_grad)


def _params(prog):
    return {n: prog.params(n) for n in prog.levels}


def test_dropout_in_a_captured_graph_draws_at_run_time_as_the_function_does():
    net, logits, train, val = bert(dropout=0.2)
    prog, _ = reweighting(net, logits, train, val, ml.hypergrad.Unroll())
    traced = prog.levels["inner"].traced
    assert not traced.opaque and "aten.dropout" in traced.graph.code
    assert prog.plan.levels["inner"].random  # each update gets a seed: its replays see its masks
    params, args = _params(prog), traced.batch_args(train)
    kwargs = {ph: params[lvl][p] for ph, (lvl, p) in traced.inputs.items()}
    outs = []
    for through_graph, seed in ((True, 0), (False, 0), (True, 1)):  # the function itself: traced.direct
        torch.manual_seed(seed)
        outs.append(traced.graph(*args, **kwargs) if through_graph else traced.direct(params, train))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=0)  # same seed: the same masks
    assert not torch.allclose(outs[0], outs[2])                       # another seed: other masks


def test_dropout_of_probability_zero_draws_nothing_and_needs_no_seed():
    """A model configured without dropout keeps its aten.dropout(x, 0.0, True) calls; they draw
    nothing from the generator, so the level's updates are not seeded (a generator fork per
    evaluation, a quarter of an eager step here, for nothing)."""
    net, logits, train, val = encoder()
    prog, _ = reweighting(net, logits, train, val, ml.hypergrad.Unroll())
    assert "aten.dropout" in prog.levels["inner"].graph.code and not prog.plan.levels["inner"].random
    state = torch.get_rng_state()
    prog.step()
    assert torch.equal(torch.get_rng_state(), state)  # the step drew nothing


def test_captured_graph_is_guarded_by_the_batch_shapes():
    """A batch of other shapes (an epoch's last, partial batch) never runs the graph captured for
    the first shapes: it gets its own capture, inside transforms too, with the function's numbers."""
    net, logits, train, val = gpt2()
    prog, _ = reweighting(net, logits, train, val, ml.hypergrad.Unroll())
    traced = prog.levels["inner"].traced
    assert not traced.opaque
    params = _params(prog)
    guard = traced.graph.shape_guard
    for rows, length in ((N - 2, 5), (N, 3)):
        batch = (train[0][:rows, :length], train[1][:rows])
        w = torch.zeros(rows, dtype=DT)
        p = {**params, "outer": {"w": w}}

        got = torch.func.grad(lambda own: traced({**p, "inner": own}, batch))(params["inner"])
        want = torch.func.grad(lambda own: traced.direct({**p, "inner": own}, batch))(params["inner"])
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-14)
    assert len(guard.graphs) == 3  # the example's shapes and the two new ones, each captured


def test_value_dependent_control_flow_still_falls_back_to_an_opaque_call():
    """make_fx on fake tensors cannot branch on values: such a level stays opaque (never a graph
    that baked in one branch)."""
    net, logits, train, val = encoder()

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.1), data=train)
    def only(net, batch):
        x, y = batch
        out = net(x)
        if out.sum() > 0:
            out = -out
        return F.cross_entropy(out, y)

    with pytest.warns(ml.TraceWarning, match="level 'only' could not be traced.*make_fx could not capture it either"):
        prog = ml.Program(only)
    assert prog.levels["only"].traced.opaque and "data-dependent" in prog.levels["only"].traced.reason
