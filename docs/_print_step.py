"""Writes the printed plan and generated step of the quickstart program into docs/design.md.

    python docs/_print_step.py     # after a change to the plan or the code generator

``tests/test_plan.py`` checks that the page shows what the program prints.
"""
import ast
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from examples import hpo_logreg, three_level_sources  # noqa: E402

PAGE = ROOT / "docs" / "design.md"


def code_lines(source: str) -> int:
    """Lines of ``source`` that are code: not blank, comments or docstrings."""
    docs = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.Module)) and ast.get_docstring(node) is not None:
            docs |= set(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    return sum(1 for n, line in enumerate(source.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and n not in docs)


def quickstart(method: str):
    train, val, _, _ = hpo_logreg.make_data(0)
    return hpo_logreg.build(train, val, method=method)[0]


def three_levels():
    def data(n):
        return torch.randn(n, 64), torch.randint(0, three_level_sources.CLASSES, (n,))
    source = torch.randint(0, len(three_level_sources.NOISE), (40,))
    return three_level_sources.build(data(40), source, data(20), data(20))[0]


def main():
    cg = quickstart("cg")
    counts = {"LINES": code_lines(cg.code), "UNROLL": code_lines(quickstart("unroll").code),
              "THREE": code_lines(three_levels().code)}
    page = PAGE.read_text()
    plan = re.compile(r"(\(`examples/hpo_logreg.py`.*?\n\n```text\n).*?(\n```\n)", re.S)
    page = plan.sub(lambda m: m.group(1) + str(cg.plan) + m.group(2), page, count=1)
    step = re.compile(r"(The step of the program above \(`prog.code`: )\S+( lines of code besides docstrings and "
                      r"comments;\nthe same program with `Unroll\(\)` has )\S+("
                      r", and `examples/three_level_sources.py` )\S+?(\):\n\n```python\n).*?(```\n)", re.S)
    page = step.sub(lambda m: (m.group(1) + str(counts["LINES"]) + m.group(2) + str(counts["UNROLL"]) + m.group(3)
                               + str(counts["THREE"]) + m.group(4) + cg.code + m.group(5)), page, count=1)
    PAGE.write_text(page)
    print(counts)


if __name__ == "__main__":
    main()
