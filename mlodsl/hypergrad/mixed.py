"""Mixed-mode unrolling (MixFlow-MG): Unroll's reverse pass with forward-over-reverse
Hessian-vector products and one update rematerialized at a time."""
from __future__ import annotations

from .. import autodiff
from ..tree import split_differentiable, tree_add, tree_map, tree_zeros_like
from .base import Method, Trajectory


class MixedUnroll(Method):
    """The exact hypergradient of ``Unroll``, with each update's second-order product taken by
    forward-over-reverse instead of reverse-over-reverse (MixFlow-MG, Kemaev et al. 2025).

    An update is S_{k+1} = Φ(S_k, θ_U, g_k), with g_k = ∇_θ L_k(θ_k, θ_U) the lower level's
    gradient and Φ the rest of the update (gradient clipping, the optimizer with its state,
    projection). The reverse pass carries λ_{k+1} back through it as

        (λ_S, ḡ_U, u) = VJP of Φ at (S_k, θ_U, g_k) with λ_{k+1}   (first order: no derivative of L)
        λ_k = λ_S + H_θθ u,   ḡ_U += ∇_U-part + H_Uθ u

    and both Hessian products come from one ``torch.func.jvp`` of the joint gradient
    ∇_{(θ, θ_U)} L_k in the direction (u, 0): the Hessian of L_k in (θ, θ_U) is symmetric, so that
    forward derivative of the gradient *is* the VJP of g_k, in both blocks at once. Only the
    iterates S_0..S_K are kept; the reverse pass recomputes one update's gradient at a time and
    holds the activations of one forward-over-reverse evaluation (the forward pass, its backward
    and their tangents), never the graph of a backward pass. Same numbers as ``Unroll``, whose
    default instead records every update's gradient graph on the autograd tape.

    The lower level must have no lower levels of its own (its update's gradient is then the
    gradient of one loss); the Program refuses it otherwise, at build. Every op of the lower loss
    needs a forward-mode derivative of its backward (checked once at build, as Unroll's double
    backward is). Memory O(K·d) for the iterates plus one update's forward-over-reverse; time
    about one gradient plus one forward-over-reverse product per update in the reverse pass.
    """

    keeps_path = True
    replays_updates = True    # differentiates the optimizer updates
    second_order = True       # the updates contain the lower gradient
    leaf_only = True          # Trajectory.update_split exists only for a level without lower levels
    forward_over_reverse = True  # its Hessian products are jvp-of-grad (mlodsl.kernels checks them at build)

    def __repr__(self) -> str:
        return "MixedUnroll()"

    def workspace(self, state_bytes: int, param_bytes: int) -> int:
        """λ on the block state, the state and its image; the gradient, its cotangent u and H u."""
        return 3 * state_bytes + 3 * param_bytes

    def vjp(self, traj: Trajectory, cotangent: dict) -> dict:
        if traj.update_split is None:  # the Program refuses such levels at build (leaf_only)
            raise RuntimeError(f"level '{traj.level}': MixedUnroll needs a level without lower levels")
        lam = tree_zeros_like(traj.final)
        for name, ct in cotangent.items():
            lam[name] = {**lam[name], "params": ct}
        lam_floats, _ = split_differentiable(lam)
        total = tree_zeros_like(traj.upper)
        for k in reversed(range(traj.steps)):
            lam_floats, upper_ct = self.update_vjp(traj, traj.path[k], k, lam_floats)
            total = tree_add(total, upper_ct)
        if traj.starts_from_upper:  # MAML: the start itself is θ_U's
            lam_start = split_differentiable(traj.path[0])[1](lam_floats)
            total = tree_add(total, traj.start_vjp(lam_start[traj.level]["params"]))
        return total

    @staticmethod
    def update_vjp(traj: Trajectory, state: dict, k: int, lam: list) -> tuple:
        """``(∂S_{k+1}/∂S_k ᵀ λ, ∂S_{k+1}/∂θ_U ᵀ λ)`` of the k-th update at S_k, λ on the floating
        leaves of S_{k+1} (as ``Trajectory.update_vjp``), by the mixed-mode rule above."""
        losses, scale, apply = traj.update_split(k)
        own, upper = traj.own(state), traj.upper
        grad = None
        for loss in losses:  # the gradient at S_k (first order), summed over micro-batches
            g = autodiff.grad(loss)(own, upper)
            grad = g if grad is None else tree_add(grad, g)
        grad = tree_map(lambda x: x / scale, grad)

        floats, join = split_differentiable(state)

        def applied(state_floats, upper_, grad_):
            return split_differentiable(apply(join(state_floats), upper_, grad_))[0]

        (lam_state, upper_ct, u), _ = autodiff.vjp(applied, (floats, upper, grad), lam, output=False)
        del grad  # not needed by the product below: free it before its peak

        # H u in (θ, θ_U) by forward-over-reverse: the tangent of the joint gradient along (u, 0)
        h_own, h_upper = None, None
        for loss in losses:
            ho, hu = autodiff.forward_over_reverse(loss, (own, upper), (u, None))
            h_own = ho if h_own is None else tree_add(h_own, ho)
            h_upper = hu if h_upper is None else tree_add(h_upper, hu)
        lam_tree = join(lam_state)
        mine = lam_tree[traj.level]
        lam_tree = {**lam_tree, traj.level: {**mine, "params": tree_map(
            lambda a, h: a + h / scale, mine["params"], h_own)}}
        return split_differentiable(lam_tree)[0], tree_map(lambda a, h: a + h / scale, upper_ct, h_upper)
