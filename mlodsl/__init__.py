"""mlodsl: gradient-based multilevel optimization on PyTorch, written as decorated functions.

    @ml.level(module, optimizer=..., data=..., depends_on=[...])
    def name(own_module, batch, other_level, ...): return loss

``ml.Program(top)`` traces the levels (torch.fx), analyzes their DAG (networkx), plans a schedule
and generates one fused training step from torch.func transforms.
"""
from . import callbacks, constraints, distributed, hypergrad, optim, precision
from .check import check_hypergradient
from .checkpoint import CheckpointError
from .data import DataExhaustedError
from .graph import ProgramError, ReadCycleWarning
from .hyper import Hyper
from .level import Level, level
from .program import NonFiniteError, Program, load
from .trace import TraceWarning

__version__ = "0.1.0"

__all__ = ["level", "Level", "Hyper", "Program", "load", "optim", "hypergrad", "constraints", "callbacks",
           "distributed", "precision", "ProgramError", "NonFiniteError", "TraceWarning", "ReadCycleWarning",
           "check_hypergradient", "CheckpointError", "DataExhaustedError"]
