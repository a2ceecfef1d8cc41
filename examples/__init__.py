"""The MLO zoo's scripts, importable as the package ``mlodsl_examples`` (pyproject.toml maps it to this folder).

The notebooks and the scripts import the shared helpers from it, e.g.
``from mlodsl_examples.digits_data import digits``; each script still runs as ``python examples/<name>.py``.
"""
