"""Unique Python identifiers for generated source: the step (``codegen``) and traced graphs (``trace``).

Level and parameter names are arbitrary strings (``low-a``, ``net.head``); made into identifiers
they can meet (``low-a`` and ``low_a`` are both ``low_a``; level ``a``'s ``b_c`` and level
``a_b``'s ``c`` are both ``a_b_c``). Every identifier derived from them is created in a
``Namespace``, which never gives two of them one name.
"""
from __future__ import annotations

import keyword
import re


class Namespace:
    """Unique Python identifiers (torch.fx's graph namespace is the model): a candidate is made an
    identifier (other characters become ``_``; a leading digit or a keyword gets a leading ``_``),
    and one already taken gets the first free suffix ``_1``, ``_2``, ...; the same ``key`` always
    gets the same name. No two keys ever get one name, so nothing generated shadows anything else."""

    def __init__(self, reserved=()):
        self._used = set(reserved)
        self._names: dict = {}

    def create(self, candidate: str, key=None) -> str:
        if key is not None and key in self._names:
            return self._names[key]
        base = re.sub(r"\W", "_", candidate)
        if not base.isidentifier() or keyword.iskeyword(base):
            base = "_" + base
        name, n = base, 0
        while name in self._used:
            n += 1
            name = f"{base}_{n}"
        self._used.add(name)
        if key is not None:
            self._names[key] = name
        return name
