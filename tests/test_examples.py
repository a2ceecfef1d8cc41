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


def test_hpo_logreg_runs_and_reports():
    out = run_example("hpo_logreg.py", "--iters", "3", "--inner-steps", "5", "--no-progress")
    for figure in ("time per outer step:", "final validation loss", "validation accuracy",
                   "test accuracy", "learned L2 penalties"):
        assert figure in out, out


def test_hpo_logreg_is_reproducible():
    args = ("--iters", "2", "--inner-steps", "3", "--no-progress", "--seed", "1")
    strip = lambda out: [l for l in out.splitlines() if not l.startswith("time per outer step")]
    assert strip(run_example("hpo_logreg.py", *args)) == strip(run_example("hpo_logreg.py", *args))
