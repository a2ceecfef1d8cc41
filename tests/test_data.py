"""Data streams (mlodsl.data): a generator is streamed in constant memory, refuses to cycle when it
ends, and refuses a checkpoint it cannot be positioned at, before anything changes."""
import gc
import weakref

import pytest
import torch

import mlodsl as ml
from mlodsl.data import BatchStream
from helpers import DT


def endless(size=256):
    while True:
        yield torch.randn(size)


def test_an_endless_generator_is_streamed_without_keeping_its_batches():
    stream = BatchStream("inner", endless())
    drawn = []
    for _ in range(50):
        drawn.append(weakref.ref(stream.next()))  # the batch is dropped here by the caller
    gc.collect()
    assert sum(r() is not None for r in drawn) == 0  # the stream holds none of them


def test_a_finite_generator_that_ends_says_how_to_cycle_it():
    stream = BatchStream("inner", (torch.full((2,), float(i)) for i in range(3)))
    assert [float(stream.next()[0]) for _ in range(3)] == [0.0, 1.0, 2.0]
    with pytest.raises(ml.DataExhaustedError, match=r"level 'inner'.*exhausted after 3 batches.*pass a list, "
                                                    r"a re-iterable \(e.g. a DataLoader\) or a callable"):
        stream.next()
    assert stream.position == 3
    as_list = BatchStream("inner", [torch.tensor(1.0), torch.tensor(2.0)])  # a re-iterable cycles
    assert [float(as_list.next()) for _ in range(5)] == [1.0, 2.0, 1.0, 2.0, 1.0]


def generator_program(gen):
    h = ml.Hyper(w=torch.zeros(3, dtype=DT))

    @ml.level(h, optimizer=ml.optim.sgd(lr=0.1, momentum=0.9), data=gen)
    def only(m, batch):
        return ((m.w - batch) ** 2).sum()

    return ml.Program(only)


def batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randn(3, generator=g, dtype=DT)


def test_a_generator_fed_program_refuses_a_state_at_another_position_and_changes_nothing():
    run = generator_program(batches())
    for _ in range(3):
        run.step()
    sd = run.state_dict()
    fresh = generator_program(batches())  # a new generator, at its start
    params, history = fresh.params("only"), list(fresh.history)
    with pytest.raises(ml.CheckpointError, match=r"level 'only': its data is a one-shot iterator \(generator\) "
                                                 r"standing after 0 batches.*checkpoint's 3: pass a list, a "
                                                 r"re-iterable \(e.g. a DataLoader\) or a callable"):
        fresh.load_state_dict(sd)
    assert torch.equal(fresh.params("only")["w"], params["w"]) and fresh.history == history
    assert fresh._streams["only"].position == 1  # only the batch drawn at build: nothing was skipped


def test_a_generator_fed_program_reloads_a_state_at_its_own_position_and_continues_unchanged():
    run, ref = generator_program(batches()), generator_program(batches())
    for _ in range(3):
        run.step(), ref.step()
    run.hypergradient("only")  # draws the next batch ahead: it must be used, not skipped
    run.load_state_dict(run.state_dict())
    for _ in range(3):
        assert run.step() == ref.step()
