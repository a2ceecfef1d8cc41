"""autodiff's modes (torch.func forced, inside a tape product) are context variables: set by context
managers, restored on exit and on error, and private to the thread that set them."""
import threading

import pytest
import torch

from mlodsl import autodiff


def test_torch_func_products_is_restored_on_exit_and_on_error():
    assert autodiff.on_tape()
    with autodiff.torch_func_products():
        assert not autodiff.on_tape()
        with autodiff.torch_func_products(False):  # nested: chosen as usual again
            assert autodiff.on_tape()
        assert not autodiff.on_tape()
    assert autodiff.on_tape()
    with pytest.raises(RuntimeError), autodiff.torch_func_products():
        raise RuntimeError("boom")
    assert autodiff.on_tape()


def test_a_product_evaluated_for_an_enclosing_product_keeps_its_graph():
    x = torch.tensor(2.0, dtype=torch.float64)
    cube_gradient = autodiff.grad(lambda z: z ** 3)
    assert not autodiff.inside_product()
    alone = cube_gradient(x)
    with autodiff.evaluating():
        assert autodiff.inside_product()
        nested = cube_gradient(x)
    assert not autodiff.inside_product()
    assert alone.item() == nested.item() == 12.0  # 3 x²
    assert not alone.requires_grad  # nothing differentiates it: no graph is built
    assert nested.requires_grad  # an enclosing product will differentiate it: built with create_graph


def test_modes_do_not_leak_into_another_thread():
    seen = {}

    def other():
        seen["on_tape"], seen["inside"] = autodiff.on_tape(), autodiff.inside_product()

    with autodiff.torch_func_products(), autodiff.evaluating():
        assert not autodiff.on_tape() and autodiff.inside_product()
        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert seen == {"on_tape": True, "inside": False}


def test_a_transform_is_seen_inside_every_torch_func_transform_and_nowhere_else():
    """``in_transform`` (a dispatch-key check) answers as functorch's own level does, inside grad,
    vjp, jvp and vmap, nested or not, and after each; the tape's products are taken only outside."""
    seen = []

    def probe(x):
        seen.append((autodiff.in_transform(), torch._C._functorch.maybe_current_level() is not None,
                     autodiff.on_tape()))
        return (x * x).sum()

    x = torch.ones(3, dtype=torch.float64)
    assert not autodiff.in_transform() and autodiff.on_tape()
    torch.func.grad(probe)(x)
    torch.func.vjp(probe, x)
    torch.func.jvp(probe, (x,), (x,))
    torch.func.vmap(probe)(x.reshape(3, 1))
    torch.func.vmap(torch.func.grad(probe))(x.reshape(3, 1))
    assert seen and all(s == (True, True, False) for s in seen)
    assert not autodiff.in_transform() and autodiff.on_tape()
    # a gradient inside a transform is torch.func's, outside it the tape's: the same numbers
    inside = torch.func.vmap(autodiff.grad(lambda z: (z ** 3).sum()))(x.reshape(3, 1))
    outside = autodiff.grad(lambda z: (z ** 3).sum())(x)
    torch.testing.assert_close(inside.reshape(3), 3 * x ** 2)
    torch.testing.assert_close(outside, 3 * x ** 2)
