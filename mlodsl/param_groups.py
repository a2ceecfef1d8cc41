"""Parameter groups: which hyperparameters each parameter of a level's optimizer uses.

``groups={key: {hyperparameter: value}}`` (see ``mlodsl.optim``). A key matches a parameter name
exactly, as a module prefix (``"features"`` matches ``features.0.weight``, not ``features2.weight``)
or, when it holds a glob character, by ``fnmatch``. A parameter takes the optimizer's defaults,
replaced by the values of every group matching it; two groups setting the same hyperparameter of one
parameter, and a group matching nothing, are refused (a typo must not silently leave a part of the
model on the defaults).
"""
from __future__ import annotations

from fnmatch import fnmatchcase

_GLOB = set("*?[")


class GroupError(ValueError):
    """Parameter groups that do not fit the level's parameters (no match, or two groups disagree)."""


def check_groups(optimizer: str, groups, allowed: tuple | None) -> dict:
    """``groups`` as a plain dict, checked when the optimizer is made. ``allowed``: the
    hyperparameters a group may set (None: any, for ``from_torch``, where torch.optim checks)."""
    if groups is None:
        return {}
    if not isinstance(groups, dict):
        raise TypeError(f"{optimizer}: groups must be a dict {{parameter name or prefix: dict(lr=...)}}, "
                        f"got {type(groups).__name__}")
    out = {}
    for key, values in groups.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"{optimizer}: a group's key must be a parameter name, a module prefix or a glob "
                            f"(a non-empty str), got {key!r}")
        if not isinstance(values, dict) or not values:
            raise TypeError(f"{optimizer}: groups[{key!r}] must be a non-empty dict of hyperparameters, "
                            f"e.g. dict(lr=0.01); got {values!r}")
        unknown = sorted(set(values) - set(allowed)) if allowed is not None else []
        if unknown:
            raise TypeError(f"{optimizer}: group {key!r} sets {unknown}; a group may set {list(allowed)} "
                            f"(the other options are the optimizer's, for every parameter)")
        out[key] = dict(values)
    return out


def matches(key: str, name: str) -> bool:
    """Whether group ``key`` covers parameter ``name``."""
    if _GLOB & set(key):
        return fnmatchcase(name, key)
    return name == key or name.startswith(key + ".")


class ParamGroups:
    """The groups of one optimizer; ``assign`` maps parameter names to the groups covering them."""

    def __init__(self, optimizer: str, defaults: dict, groups: dict):
        self.optimizer, self.defaults, self.groups = optimizer, defaults, groups
        self._assigned: dict = {}  # tuple of names -> {name: tuple of group keys}; names are static

    def assign(self, names) -> dict:
        """``{parameter name: the keys of the groups covering it}``; raises ``GroupError``."""
        names = tuple(names)
        if names not in self._assigned:
            self._assigned[names] = self._assign(names)
        return self._assigned[names]

    def _assign(self, names: tuple) -> dict:
        out = {}
        for name in names:
            keys = tuple(k for k in self.groups if matches(k, name))
            for i, a in enumerate(keys):
                for b in keys[i + 1:]:
                    both = sorted(set(self.groups[a]) & set(self.groups[b]))
                    if both:
                        raise GroupError(
                            f"{self.optimizer}: parameter {name!r} is in groups {a!r} and {b!r}, which both set "
                            f"{both}; make the keys disjoint for it (e.g. a longer prefix) or set it in one group")
            out[name] = keys
        covered = {k for keys in out.values() for k in keys}
        for key in self.groups:
            if key not in covered:
                shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
                raise GroupError(
                    f"{self.optimizer}: group {key!r} matches no parameter of the level (its parameters: {shown}); "
                    f"a key is a parameter name, a module prefix ('features' for 'features.0.weight') or a glob "
                    f"('*.bias')")
        return out

    def values(self, names, value_of) -> dict:
        """``{parameter name: {hyperparameter: value}}``, where ``value_of(v)`` resolves one value
        (a schedule or a level's read); each default and each group value is resolved once, and
        parameters in the same groups share one dict."""
        assigned = self.assign(names)
        defaults = {h: value_of(v) for h, v in self.defaults.items()}
        if not self.groups:
            return dict.fromkeys(assigned, defaults)
        per_group = {key: {h: value_of(v) for h, v in group.items()} for key, group in self.groups.items()}
        merged: dict = {}
        out = {}
        for name, keys in assigned.items():
            if keys not in merged:
                merged[keys] = dict(defaults)
                for key in keys:
                    merged[keys].update(per_group[key])
            out[name] = merged[keys]
        return out

    def torch_groups(self, leaves: dict) -> list:
        """``leaves`` (name -> tensor) as torch.optim param groups: one per combination of groups."""
        by_keys: dict = {}
        for name, keys in self.assign(leaves).items():
            by_keys.setdefault(keys, []).append(leaves[name])
        out = []
        for keys, params in by_keys.items():
            options = {}
            for key in keys:
                options.update(self.groups[key])
            out.append({"params": params, **options})
        return out
