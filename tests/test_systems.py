"""Systems around the generated step: precision, loss scaling, gradient accumulation, clipping,
atomic checkpoints, callbacks. Each wraps the step or is handed to it; none changes its math."""
import csv
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mlodsl as ml
from helpers import DT
from mlodsl.tree import tree_leaves

F32 = torch.float32


def logreg_hpo(precision="fp32", inner_precision=None, K=5, n=256, d=20, dtype=F32, seed=0, **prog_kw):
    """Per-feature L2 for logistic regression (float32 unless told), a fixed batch per level."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2 * n, d, generator=g, dtype=dtype)
    y = (X @ torch.randn(d, generator=g, dtype=dtype) > 0).to(dtype)
    torch.manual_seed(seed)
    net = nn.Linear(d, 1).to(dtype)
    hyper = ml.Hyper(log_l2=torch.full((d,), -3.0, dtype=dtype))

    @ml.level(net, optimizer=ml.optim.sgd(lr=0.5), data=(X[:n], y[:n]), steps=K, precision=inner_precision)
    def inner(net, batch, outer):
        x, t = batch
        return F.binary_cross_entropy_with_logits(net(x).squeeze(-1), t) + \
            (outer.log_l2.exp() * net.weight.squeeze(0) ** 2).sum()

    @ml.level(hyper, optimizer=ml.optim.adam(lr=0.05), data=(X[n:], y[n:]), depends_on=[inner])
    def outer(hyper, batch, inner):
        x, t = batch
        return F.binary_cross_entropy_with_logits(inner(x).squeeze(-1), t)

    return ml.Program(outer, precision=precision, **prog_kw)


# -- precision ------------------------------------------------------------------------------------
def test_bf16_on_cpu_ends_close_to_fp32_and_keeps_parameters_fp32():
    rows = {}
    for p in ("fp32", "bf16"):
        prog = logreg_hpo(p)
        for _ in range(20):
            row = prog.step()
        rows[p] = row
        assert all(v.dtype == F32 for n in ("inner", "outer") for v in prog.params(n).values())
    assert rows["bf16"]["outer"] == pytest.approx(rows["fp32"]["outer"], rel=2e-2)
    assert rows["bf16"]["outer"] != rows["fp32"]["outer"]  # autocast really ran in bf16


def test_a_level_overrides_the_program_precision():
    prog = logreg_hpo("fp32", inner_precision="bf16")
    assert prog.precision == {"inner": "bf16", "outer": "fp32"}
    ref = logreg_hpo("fp32")
    a, b = prog.step(), ref.step()
    assert a["outer"] == pytest.approx(b["outer"], rel=2e-2) and a["inner"] != b["inner"]
    with pytest.raises(ValueError, match="precision must be one of"):
        logreg_hpo("fp8")


def test_float64_problems_stay_float64_under_bf16():
    prog = logreg_hpo("bf16", dtype=DT, K=2)
    ref = logreg_hpo("fp32", dtype=DT, K=2)
    for _ in range(2):
        prog.step(), ref.step()
    for k, v in ref.params("outer").items():
        assert prog.params("outer")[k].dtype == DT
        torch.testing.assert_close(prog.params("outer")[k], v, rtol=0, atol=0)  # autocast leaves fp64 alone


def test_fp16_overflow_skips_the_step_unchanged_and_backs_the_scale_off():
    prog = logreg_hpo("fp16", K=2)
    assert set(prog.scalers) == {"inner", "outer"}
    prog.step()
    before = {n: prog.params(n) for n in prog.levels}
    opt_before = prog.state_dict()["levels"]["outer"]["opt"]
    prog.scalers["inner"].scale = 2.0 ** 60  # scale·gradient overflows fp16 (max 65504)
    row = prog.step()
    assert row["skipped"] == 1 and prog.step_count == 1
    assert row["inner/loss_scale"] == 2.0 ** 59 and prog.scalers["inner"].overflows == 1
    for n, p in before.items():
        for k, v in p.items():
            assert torch.equal(prog.params(n)[k], v), (n, k)
    after = tree_leaves(prog.state_dict()["levels"]["outer"]["opt"])
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(after, tree_leaves(opt_before)))
    prog.scalers["inner"].scale = 2.0 ** 10
    row = prog.step()
    assert "skipped" not in row and prog.step_count == 2 and math.isfinite(row["outer"])


def test_fp16_scale_grows_until_it_overflows_and_training_ends_close_to_fp32():
    prog, ref = logreg_hpo("fp16"), logreg_hpo("fp32")
    for sc in prog.scalers.values():
        sc.growth_interval = 3
    while prog.step_count < 20:
        prog.step()
    for _ in range(20):
        ref.step()
    scales = [r["inner/loss_scale"] for r in prog.history]
    assert max(scales) >= 2.0 ** 19 and prog.scalers["inner"].overflows >= 1  # grew, then backed off
    assert len(prog.history) == 20 + sum(r.get("skipped", 0) for r in prog.history)
    assert prog.history[-1]["outer"] == pytest.approx(ref.history[-1]["outer"], rel=2e-2)


def test_loss_scaler_state_is_checkpointed(tmp_path):
    prog = logreg_hpo("fp16", K=2)
    prog.step()
    prog.scalers["inner"].scale = 2.0 ** 60
    prog.step()
    prog.save(tmp_path / "c.pt")
    fresh = ml.load(tmp_path / "c.pt", logreg_hpo("fp16", K=2))
    assert fresh.scalers["inner"].state_dict() == prog.scalers["inner"].state_dict() == \
        {"scale": 2.0 ** 59, "good_steps": 0, "overflows": 1}
    assert fresh.scalers["outer"].state_dict() == prog.scalers["outer"].state_dict()


# -- gradient accumulation ------------------------------------------------------------------------
def _accum_pair(method, N):
    """The same problem with N micro-batches per update, and with one N-times batch."""
    g = torch.Generator().manual_seed(1)
    X, w = torch.randn(240, 5, generator=g, dtype=DT), torch.randn(5, generator=g, dtype=DT)
    y = (X @ w + 0.3 * torch.randn(240, generator=g, dtype=DT) > 0).to(DT)
    train = [(X[i:i + 10], y[i:i + 10]) for i in range(0, 120, 10)]
    val = [(X[i:i + 10], y[i:i + 10]) for i in range(120, 240, 10)]
    big = lambda mbs: [(torch.cat([b[0] for b in mbs[i:i + N]]), torch.cat([b[1] for b in mbs[i:i + N]]))
                       for i in range(0, len(mbs), N)]
    progs = []
    for train_, val_, accum in ((train, val, N), (big(train), big(val), 1)):
        torch.manual_seed(0)
        net, hyper = nn.Linear(5, 1).to(DT), ml.Hyper(log_l2=torch.full((5,), -2.0, dtype=DT))

        @ml.level(net, optimizer=ml.optim.sgd(lr=0.5), data=train_, steps=2, hypergrad=method)
        def inner(net, batch, outer):
            x, t = batch
            return F.binary_cross_entropy_with_logits(net(x).squeeze(-1), t) + \
                (outer.log_l2.exp() * net.weight.squeeze(0) ** 2).sum()

        @ml.level(hyper, optimizer=ml.optim.adam(lr=0.05), data=val_, depends_on=[inner])
        def outer(hyper, batch, inner):
            x, t = batch
            return F.binary_cross_entropy_with_logits(inner(x).squeeze(-1), t)

        progs.append(ml.Program(outer, grad_accum=accum))
    return progs


@pytest.mark.parametrize("method", [ml.hypergrad.Unroll(), ml.hypergrad.CG(iters=5)], ids=repr)
def test_grad_accum_equals_one_n_times_batch(method):
    accum, big = _accum_pair(method, N=3)
    for _ in range(3):
        a, b = accum.step(), big.step()
        assert a["outer"] == pytest.approx(b["outer"], rel=1e-12)
    for n in ("inner", "outer"):
        for k, v in big.params(n).items():
            torch.testing.assert_close(accum.params(n)[k], v, rtol=1e-6, atol=1e-9)
    assert accum.state_dict()["data"] == {"inner": 18, "outer": 9}  # micro-batches drawn so far


def test_grad_accum_must_be_a_positive_int():
    with pytest.raises(ValueError, match="grad_accum must be a positive int"):
        logreg_hpo(grad_accum=0)


# -- gradient clipping ----------------------------------------------------------------------------
def test_clip_grad_norm_bounds_the_update_of_its_level():
    h = ml.Hyper(w=torch.tensor([3.0, 4.0], dtype=DT))

    @ml.level(h, optimizer=ml.optim.sgd(lr=1.0), clip_grad_norm=0.5)
    def only(m):
        return (m.w ** 2).sum()  # gradient (6, 8): norm 10

    prog = ml.Program(only)
    row = prog.step()
    assert row["only/grad_norm"] == pytest.approx(10.0)  # the log shows the gradient before clipping
    torch.testing.assert_close(prog.params("only")["w"], torch.tensor([3 - 0.3, 4 - 0.4], dtype=DT))
    with pytest.raises(ValueError, match="clip_grad_norm must be a positive number"):
        ml.level(h, optimizer=ml.optim.sgd(lr=1.0), clip_grad_norm=0)(lambda m: m.w.sum())


# -- checkpoints ----------------------------------------------------------------------------------
def test_a_crash_while_saving_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    prog = logreg_hpo(K=2)
    prog.step()
    path = tmp_path / "ckpt.pt"
    prog.save(path)
    saved = path.read_bytes()
    prog.step()
    real_save = torch.save

    def crash_midway(obj, f, *a, **kw):
        real_save(obj, f, *a, **kw)
        with open(f, "r+b") as fh:  # a half-written file, then the process "dies"
            fh.truncate(100)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        prog.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == saved and not list(tmp_path.glob("*.tmp"))
    restored = ml.load(path, logreg_hpo(K=2))
    assert restored.step_count == 1


# -- callbacks ------------------------------------------------------------------------------------
def test_csv_logger_writes_every_row_and_widens_for_new_columns(tmp_path):
    prog = logreg_hpo(K=2)
    log = ml.callbacks.CSVLogger(tmp_path / "log.csv")
    prog.fit(4, validate=lambda p: 0.5, every=2, callbacks=[log], progress=False)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[0]["val"] == "" and rows[1]["val"] == "0.5" and float(rows[3]["outer"]) > 0


def test_tensorboard_logger_writes_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    prog = logreg_hpo(K=2)
    tb = ml.callbacks.TensorBoardLogger(tmp_path)
    prog.fit(3, callbacks=[tb], progress=False)
    tb.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert [e.step for e in acc.Scalars("outer")] == [1, 2, 3]
    assert acc.Scalars("outer")[-1].value == pytest.approx(prog.history[-1]["outer"], rel=1e-6)


def test_early_stopping_stops_after_patience_without_improvement():
    prog = logreg_hpo(K=2)
    vals = iter([1.0, 0.5, 0.6, 0.7, 0.4, 0.3])
    stop = ml.callbacks.EarlyStopping(monitor="val", patience=2, mode="min")
    hist = prog.fit(6, validate=lambda p: next(vals), every=1, callbacks=[stop], progress=False)
    assert len(hist) == 4 and stop.best == 0.5 and stop.best_step == 2
    with pytest.raises(ValueError, match="mode must be"):
        ml.callbacks.EarlyStopping(mode="up")
