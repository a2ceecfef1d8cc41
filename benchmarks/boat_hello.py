"""B1 (Betty's hello world) written for BOAT (PyPI ``boat-torch``), the floor's math through BOAT.

BOAT builds a bilevel solver from named operations: ``gm_op`` (how the lower level is solved; NGD,
plain gradient steps through higher's ``innerloop_ctx``) and ``na_op`` (how the hypergradient is
formed). Two rows:

* ``CG``: NGD then CG on the fixed-point map w - lr ∇_w L (``k = 3`` iterations, tolerance 1e-10
  so that all three run). CG is invariant to the scale of the system, so solving
  (lr H) v = ∇_w F and taking -lr ∂²L/∂λ∂w v is the floor's CG(3) on H x = ∇_w F followed by
  -∂²L/∂λ∂w x, up to rounding.
* ``RAD``: NGD with higher tracking the 100 steps, then one backward through them (reverse-mode
  differentiation: Unroll), BOAT's default (``examples/L2_Reg`` of its repository).

Both warm-start the inner level (``copy_last_param``) and learn ``log_l2`` with Adam (lr 0.1) as
the floor and the mlodsl rows do. BOAT also evaluates both losses after every outer step and
appends them to a JSON file (``loss_log_path``, a required setting); the row keeps that, since a
BOAT user gets it, and points the file into a temporary directory.

    pip install --no-deps boat-torch matplotlib   # boat-torch pins numpy<=1.26.4 and torchvision
"""
from __future__ import annotations

import os
import tempfile

import torch
import torch.nn.functional as F
from torch import nn

DATA_DIM = 20


class LowerNet(nn.Module):
    """The logistic regression's weights; ``forward`` returns them, BOAT's own examples' idiom
    (higher's patched copy answers ``forward(params=...)`` with the given fast weights)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, DATA_DIM))

    def forward(self):
        return self.weight


class UpperNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.log_l2 = nn.Parameter(torch.zeros(DATA_DIM))

    def forward(self):
        return self.log_l2


# BOAT loads its losses by dotted name and calls them as f(feed_dict, upper_model, lower_model, **kw)
def lower_loss(feed, upper_model, lower_model, **kwargs):
    w = lower_model(**kwargs)
    fit = F.binary_cross_entropy_with_logits(F.linear(feed["data"], w).squeeze(-1), feed["target"])
    return fit + 0.5 * (upper_model().exp() * w.squeeze(0) ** 2).sum()


def upper_loss(feed, upper_model, lower_model, **kwargs):
    w = lower_model(**kwargs)
    return F.binary_cross_entropy_with_logits(F.linear(feed["data"], w).squeeze(-1), feed["target"])


def make_problem(train, val, na_op: str, inner_steps: int, inner_lr: float = 0.1, outer_lr: float = 0.1):
    """A built ``boat_torch.Problem`` and its upper model; one ``run_iter`` is one outer step."""
    import boat_torch as boat

    lower, upper = LowerNet(), UpperNet()
    log_dir = tempfile.mkdtemp(prefix="boat-b1-")
    config = {
        "fo_op": None, "gm_op": ["NGD"], "na_op": [na_op], "return_grad": False,
        "lower_iters": inner_steps, "device": "cpu", "accumulate_grad": False, "copy_last_param": True,
        "fo_ol_batch_input": False, "loss_log_path": os.path.join(log_dir, "loss_log.json"),
        # read by BOAT's checks whatever the operations (values of its examples' configs)
        "GDA": {"alpha_init": 0.5, "alpha_decay": 0.9}, "RGT": {"truncate_iter": 0},
        "CG": {"k": 3, "tolerance": 1e-10},
        "lower_level_model": lower, "upper_level_model": upper,
        "lower_level_opt": torch.optim.SGD(lower.parameters(), lr=inner_lr),
        "upper_level_opt": torch.optim.Adam(upper.parameters(), lr=outer_lr),
        "lower_level_var": list(lower.parameters()), "upper_level_var": list(upper.parameters()),
    }
    losses = {"lower_level_loss": {"function": f"{__name__}.lower_loss"},
              "upper_level_loss": {"function": f"{__name__}.upper_loss"}}
    problem = boat.Problem(config, losses)
    problem.build_ll_solver()
    problem.build_ul_solver()
    return problem, upper


def feeds(train, val):
    (xt, yt), (xv, yv) = train, val
    return {"data": xt, "target": yt}, {"data": xv, "target": yv}
