"""prog.explain() prints small programs in readable units and defines its columns."""
import re

from helpers import make_hpo

from mlodsl.explain import LEGEND, LevelMemory, MemoryReport, human_bytes


def test_human_bytes_picks_a_binary_unit_per_value():
    assert human_bytes(0) == "0 B"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(1024) == "1.0 KiB"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(5 * 2 ** 20) == "5.0 MiB"
    assert human_bytes(3 * 2 ** 30) == "3.0 GiB"


def test_a_tiny_programs_table_shows_nonzero_values_and_the_legend():
    prog, *_ = make_hpo(K=3)              # float64 logistic regression, 5 features: bytes to KiB
    report = prog.explain()
    text = str(report)
    lines = text.splitlines()
    header = lines[0].split()
    assert header == ["level", "params", "optimizer", "iterates", "workspace", "activations", "total"]
    inner = next(line for line in lines if line.startswith("inner"))
    assert "48 B" in inner                # 5 weights + 1 bias in float64
    assert re.search(r"[1-9][0-9.]* KiB", inner)   # the kept iterates of the unrolled block
    assert not re.search(r"\b0\.00\b", text)       # no value rounded away to zero
    total = next(line for line in lines if line.startswith("all levels")).split()[-2:]
    assert total == human_bytes(report.total).split() and report.total > 1024
    assert text.endswith(LEGEND)          # the legend under the table defines every column
    for column in header[1:]:
        assert f"{column}:" in LEGEND


def test_the_report_keeps_bytes_for_code():
    report = MemoryReport([LevelMemory("a", params=10, optimizer=20, iterates=0, workspace=0, activations=2048)])
    assert report.total == 2078 and report[0].total == 2078
    assert "2.0 KiB" in str(report) and "10 B" in str(report)
