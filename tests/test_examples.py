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

ZOO = {
    "meta_weight_net.py": (("--iters", "5", "--imbalance", "100"), ("MW-Net", "learned weight at loss")),
    "hyper_cleaning.py": (("--iters", "3", "--inner-steps", "3", "--retrain-steps", "10"),
                          ("trained on noisy labels", "precision", "recall")),
    "darts_digits.py": (("--iters", "5", "--retrain-steps", "5"), ("DARTS 1st order", "DARTS 2nd order", "uniform")),
    "maml_sinusoid.py": (("--iters", "3", "--inner-steps", "2", "--test-tasks", "3"),
                         ("pretrain", "maml", "fomaml", "imaml")),
    "three_level_sources.py": (("--iters", "2", "--bottom-steps", "2"),
                               ("learned source weights", "three levels (source + example weights)")),
    "hpo_optimizer.py": (("--iters", "3", "--inner-steps", "5"), ("learned: lr", "grid best", "learned (lr, wd, L2)")),
    "bilevel_lora.py": (("--iters", "2", "--inner-steps", "2", "--train", "32", "--pretrain-steps", "5",
                         "--plain-lrs", "0.3"),
                        ("plain LoRA on the noisy labels", "bilevel LoRA (reweighted)", "precision", "mean weight")),
}


def _untimed(out):
    return [re.sub(r"\s+\d+ s$", "", line) for line in out.splitlines()
            if not line.startswith("total time") and "s)" not in line[-4:]]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_example_reports_its_figures_and_reproduces_them(name):
    args, figures = ZOO[name]
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
