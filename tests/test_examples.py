"""The examples run from the command line and print their figures (tiny sizes)."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run_example(name, *args, timeout=120):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_hpo_logreg_reports_its_figures_and_reproduces_them():
    args = ("--iters", "3", "--inner-steps", "5", "--no-progress", "--seed", "1")
    first, second = run_example("hpo_logreg.py", *args), run_example("hpo_logreg.py", *args)
    for figure in ("time per outer step:", "final validation loss", "validation accuracy",
                   "test accuracy", "learned L2 penalties"):
        assert figure in first, first
    untimed = lambda out: [line for line in out.splitlines() if not line.startswith("time per outer step")]
    assert untimed(first) == untimed(second)


def test_readme_test_command_is_what_ci_runs():
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2, commands
    assert commands[1] in ci.splitlines() and commands[1].endswith("-m pytest -q")


def test_readme_quickstart_runs():
    import re

    import torch

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 20, generator=g)
    y = (x[:, 0] > 0).float()
    scope = {"train": (x[:20], y[:20]), "val": (x[20:], y[20:])}
    exec(blocks[0].replace("prog.fit(iters=500)", "prog.fit(iters=2, progress=False)"), scope)
    exec(blocks[1].replace("print(", "str("), scope)
    assert [row["step"] for row in scope["prog"].history] == [1, 2]


# The MLO zoo: each example at a tiny size, run twice with its fixed seed (same numbers both times).
import re  # noqa: E402

import pytest  # noqa: E402

ZOO = {   # test id: (script, tiny arguments, figures its output must show)
    "meta_weight_net": ("meta_weight_net.py", ("--iters", "5", "--imbalance", "100"),
                        ("MW-Net", "learned weight at loss")),
    "meta_weight_net_noisy": ("meta_weight_net.py", ("--iters", "6", "--noise", "0.4"),
                              ("plain, early-stopped", "per-example", "clean only", "ROC AUC",
                               "MW-Net learned weight at loss")),
    "hyper_cleaning": ("hyper_cleaning.py", ("--iters", "3", "--inner-steps", "3", "--retrain-steps", "10"),
                       ("trained on noisy labels", "precision", "recall")),
    "darts_digits": ("darts_digits.py", ("--iters", "5", "--retrain-steps", "5"),
                     ("DARTS 1st order", "DARTS 2nd order", "uniform")),
    "maml_sinusoid": ("maml_sinusoid.py", ("--iters", "3", "--inner-steps", "2", "--imaml-steps", "2",
                                           "--cg-iters", "2", "--test-tasks", "3"),
                      ("pretrain", "maml", "fomaml", "imaml", "MSE, iMAML solve", "iMAML's inner solve")),
    "three_level_sources": ("three_level_sources.py", ("--iters", "2", "--bottom-steps", "2"),
                            ("learned source weights", "three levels (source + example weights)")),
    "hpo_optimizer": ("hpo_optimizer.py", ("--iters", "3", "--inner-steps", "5"),
                      ("learned: lr", "grid best", "learned (lr, wd, L2)")),
    "bilevel_lora": ("bilevel_lora.py", ("--iters", "2", "--inner-steps", "2", "--train", "32", "--pretrain-steps",
                                         "5", "--plain-lrs", "0.3"),
                     ("plain LoRA on the noisy labels", "bilevel LoRA (reweighted)", "precision", "mean weight")),
    "learning_by_ignoring": ("learning_by_ignoring.py", ("--iters", "3", "--middle-steps", "2", "--bottom-steps", "2"),
                             ("repeat 2× pretrain", "(with pretrain inside)", "mean learned source weight",
                              "target only", "pretrained on every source example", "learning by ignoring",
                              "oracle (shifted source only)")),
}


def _untimed(out):
    return [re.sub(r"\s+\d+ s$", "", line) for line in out.splitlines()
            if not line.startswith("total time") and "s)" not in line[-4:]]


@pytest.mark.parametrize("case", sorted(ZOO))
def test_zoo_example_reports_its_figures_and_reproduces_them(case):
    name, args, figures = ZOO[case]
    first, second = run_example(name, *args), run_example(name, *args)
    for figure in figures:
        assert figure in first, first
    assert _untimed(first) == _untimed(second)


def test_pyproject_installs_every_package_and_the_examples():
    """pyproject.toml lists its packages by hand (examples/ installs as `mlodsl_examples`): none is missing."""
    tomllib = pytest.importorskip("tomllib")        # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mlodsl").rglob("__init__.py")}
    assert sorted(config["packages"]) == sorted(found | {"mlodsl_examples"})
    assert config["package-dir"] == {"mlodsl_examples": "examples"}


def test_per_example_weights_get_the_one_step_look_ahead_hypergradient():
    """meta_weight_net's per-example reweighting (one logit per training example, indexed by the batch's
    example ids): its hypergradient equals the meta loss differentiated by hand through one SGD step
    with momentum and weight decay, in float64."""
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    from mlodsl_examples.meta_weight_net import build_example_weights, classifier

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        g = torch.Generator().manual_seed(0)
        train = (torch.randn(12, 64, generator=g), torch.randint(0, 10, (12,), generator=g))
        meta = (torch.randn(10, 64, generator=g), torch.arange(10))
        # one batch of all 12 examples: the weighted mean does not depend on their order
        prog, net, cleaner = build_example_weights(train, meta, seed=3, batch=12, lr=0.1, model="mlp")
        got = prog.hypergradient("clean")["c"]

        start = {k: v.detach().requires_grad_() for k, v in classifier(3, "mlp").named_parameters()}
        c = torch.zeros(12, requires_grad=True)
        w = torch.sigmoid(c)
        losses = F.cross_entropy(functional_call(net, start, (train[0],)), train[1], reduction="none")
        grads = torch.autograd.grad((w * losses).sum() / (w.sum() + 1e-8), list(start.values()), create_graph=True)
        after = {k: p - 0.1 * (gk + 5e-4 * p) for (k, p), gk in zip(start.items(), grads)}  # SGD's first step
        meta_loss = F.cross_entropy(functional_call(net, after, (meta[0],)), meta[1])
        want, = torch.autograd.grad(meta_loss, c)
    finally:
        torch.set_default_dtype(default)
    assert got.dtype == torch.float64 and want.abs().max() > 1e-6
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
