"""Checkpoints (mlodsl.checkpoint): plain data only, a checksum, every mismatch refused before
anything changes, and a resume that continues bit-exactly, history included."""

import pytest
import torch
from torch import nn

import mlodsl as ml
from helpers import DT, hpo_problem, logreg_data


def build(d=5, dtype=DT, outer="sgd", scale=False, seed=0, init_seed=None):
    """Per-feature L2 over lists of batches (so data positions matter), SGD with momentum inside."""
    (Xt, yt), (Xv, yv) = logreg_data(n=80, d=d, seed=seed)
    Xt, yt, Xv, yv = (t.to(dtype) for t in (Xt, yt, Xv, yv))
    train = [(Xt[i:i + 10], yt[i:i + 10]) for i in range(0, 40, 10)]
    val = [(Xv[i:i + 10], yv[i:i + 10]) for i in range(0, 40, 10)]
    opt = ml.optim.adam(lr=0.05) if outer == "adam" else ml.optim.sgd(lr=0.1)
    top, _, _ = hpo_problem(train, val, K=3, inner_opt=ml.optim.sgd(lr=0.5, momentum=0.5), outer_opt=opt, d=d,
                           dtype=dtype, seed=seed if init_seed is None else init_seed,
                           extra_hyper={"scale": torch.ones((), dtype=dtype)} if scale else None)
    return ml.Program(top)


def snapshot(prog):
    """Clones of everything a load may change: state, the user's modules, step, history, streams."""
    leaves = torch.utils._pytree.tree_flatten_with_path(prog._state)[0]
    modules = {(n, k): v.detach().clone() for n, pl in prog.levels.items()
               for k, v in pl.level.module.state_dict().items()}
    return ({str(k): v.clone() for k, v in leaves}, modules, prog.step_count, [dict(r) for r in prog.history],
            {n: s.position for n, s in prog._streams.items()})


def assert_unchanged(prog, before):
    after = snapshot(prog)
    for a, b in zip(before[:2], after[:2]):
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert before[2:] == after[2:]


def test_a_pickle_that_would_run_code_is_refused_and_the_code_does_not_run(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):  # unpickling would call open(marker, "w"): a file appears
            return open, (str(marker), "w")

    prog = build()
    prog.step()
    path = tmp_path / "evil.pt"
    torch.save({"format": "mlodsl-checkpoint", "version": 1, "sha256": "0", "state": Exploit()}, path)
    before = snapshot(prog)
    with pytest.raises(ml.CheckpointError, match=f"refused checkpoint '{path}'.*plain data"):
        ml.load(path, prog)
    assert not marker.exists()
    assert_unchanged(prog, before)


@pytest.mark.parametrize("saved, loaded, message", [
    (dict(scale=False), dict(scale=True), r"level 'outer': parameter 'scale' is missing"),
    (dict(scale=True), dict(scale=False), r"level 'outer': the checkpoint has an unexpected parameter 'scale'"),
    (dict(d=6), dict(d=5), r"level 'inner': parameter 'weight' is a float64 tensor of shape \(1, 6\) in the "
                           r"checkpoint but a float64 tensor of shape \(1, 5\) in the program"),
    (dict(dtype=torch.float32), dict(), r"level 'inner': parameter 'weight' is a float32 tensor .* float64"),
    (dict(outer="adam"), dict(outer="sgd"), r"level 'outer': its optimizer state does not fit sgd\(lr=0.1.*\n"
                                            r".*level 'outer': optimizer state is a dict with keys "
                                            r"\['count', 'm', 'v'\] in the checkpoint but a dict with keys "
                                            r"\['count'\]"),
], ids=["missing parameter", "extra parameter", "other shape", "other dtype", "adam state into sgd"])
def test_a_checkpoint_that_does_not_fit_is_refused_naming_level_and_mismatch_and_changes_nothing(
        tmp_path, saved, loaded, message):
    source = build(**saved)
    source.step()
    path = tmp_path / "other.pt"
    source.save(path)
    prog = build(**loaded)
    prog.step()
    before = snapshot(prog)
    with pytest.raises(ml.CheckpointError, match=f"checkpoint '{path}' does not fit the program") as err:
        ml.load(path, prog)
    assert err.match(message)
    assert_unchanged(prog, before)


@pytest.mark.parametrize("damage", ["flip a byte in the middle", "truncate"])
def test_a_damaged_file_is_refused_never_loaded_as_other_values(tmp_path, damage):
    source = build()
    source.step()
    path = tmp_path / "c.pt"
    source.save(path)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) * 2 // 3]
    else:
        data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    prog = build()
    before = snapshot(prog)
    with pytest.raises(ml.CheckpointError, match=f"checkpoint '{path}' is corrupted"):
        ml.load(path, prog)
    assert_unchanged(prog, before)


def test_a_saved_and_loaded_program_continues_bit_exactly_with_its_history(tmp_path):
    run = build(outer="adam")
    for _ in range(3):
        run.step()
    run.save(tmp_path / "c.pt")
    assert torch.load(tmp_path / "c.pt", weights_only=True)["format"] == "mlodsl-checkpoint"
    later = [run.step() for _ in range(3)]
    resumed = ml.load(tmp_path / "c.pt", build(outer="adam", init_seed=1))  # other initial values
    assert resumed.step_count == 3 and resumed.history == run.history[:3]
    again = [resumed.step() for _ in range(3)]
    assert again == later  # every loss of every level, exactly
    for n in run.levels:
        for k, v in run.params(n).items():
            assert torch.equal(resumed.params(n)[k], v), (n, k)
    assert resumed.history == run.history


def test_a_torch_optim_level_is_saved_as_plain_data_and_resumes_exactly(tmp_path):
    def prog():
        torch.manual_seed(0)
        h = ml.Hyper(w=torch.tensor([3.0, -1.0], dtype=DT))

        @ml.level(h, optimizer=ml.optim.from_torch(torch.optim.Adam, lr=0.1))
        def only(m):
            return ((m.w - 1.0) ** 4).sum()

        return ml.Program(only)

    run = prog()
    run.step(), run.step()
    run.save(tmp_path / "c.pt")
    saved = torch.load(tmp_path / "c.pt", weights_only=True)["state"]["levels"]["only"]["opt"]["torch"]
    assert saved["state"][0]["exp_avg"].shape == (2,)  # torch.optim's own state dict, plain data
    later = [run.step() for _ in range(2)]
    resumed = ml.load(tmp_path / "c.pt", prog())
    assert [resumed.step() for _ in range(2)] == later  # Adam's moments came back too


def test_save_errors_name_the_checkpoint_not_the_temporary_file(tmp_path, monkeypatch):
    prog = build()
    prog.step()
    path = tmp_path / "c.pt"
    prog.history[-1]["note"] = object()  # not plain data: refused before anything is written
    with pytest.raises(ml.CheckpointError, match=rf"cannot save checkpoint '{path}': state\['history'\]\[0\]"
                                                 rf"\['note'\] is a object"):
        prog.save(path)
    del prog.history[-1]["note"]

    def disk_full(obj, f, *a, **kw):
        raise OSError(28, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=f"could not write checkpoint '{path}': No space left on device$"):
        prog.save(path)
    assert not list(tmp_path.iterdir())


def test_load_state_dict_refuses_a_wrong_step_or_missing_entries_before_changing_anything():
    prog = build()
    prog.step()
    sd = prog.state_dict()
    before = snapshot(prog)
    with pytest.raises(ml.CheckpointError, match=r"has no \['history'\]"):
        prog.load_state_dict({k: v for k, v in sd.items() if k != "history"})
    with pytest.raises(ml.CheckpointError, match=r"level 'inner': .*optimizer state\['momentum'\]\['weight'\]"):
        bad = {**sd, "levels": {**sd["levels"], "inner": {**sd["levels"]["inner"],
                                                           "opt": {**sd["levels"]["inner"]["opt"], "momentum": {
                                                               "weight": torch.zeros(2, dtype=DT),
                                                               "bias": torch.zeros(1, dtype=DT)}}}}}
        prog.load_state_dict(bad)
    assert_unchanged(prog, before)


def test_running_statistics_are_saved_and_restored(tmp_path):
    def prog():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(DT)
        g = torch.Generator().manual_seed(0)
        data = [torch.randn(8, 3, generator=g, dtype=DT) for _ in range(3)]

        @ml.level(net, optimizer=ml.optim.sgd(lr=0.1), data=data)
        def only(m, batch):
            return (m(batch) ** 2).mean()

        return ml.Program(only)

    run = prog()
    run.step(), run.step()
    run.save(tmp_path / "c.pt")
    resumed = ml.load(tmp_path / "c.pt", prog())
    run.step(), resumed.step()
    for k, v in run.levels["only"].level.module.state_dict().items():
        assert torch.equal(resumed.levels["only"].level.module.state_dict()[k], v), k
