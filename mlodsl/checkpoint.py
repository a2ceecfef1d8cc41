"""Checkpoints: a Program's state as plain data, checked against the program before any of it is used.

A program hands its pieces over as ``Parts``. ``state_dict(parts)`` holds only tensors, numbers,
strings, ``None``, lists, tuples and dicts: every level's parameters and optimizer state (a
``torch.optim`` optimizer as its own state dict), its module's buffers, the data positions, the fp16
loss scales, torch's RNG state, the step count and ``history``. ``save`` writes
``{"format", "version", "sha256", "state"}`` with ``torch.save`` (to a temporary file, then a
rename); the sha256 covers the structure and every tensor's dtype, shape and bytes. ``read`` reads
the file with ``weights_only=True``, so a file holding anything but
plain data (a pickle that would run code) is refused without running it, and a file whose checksum
does not match (a flipped byte, a truncation) is refused too.

``restore(parts, sd)`` first checks everything against the program (levels, parameter names,
shapes and dtypes, the optimizer state's structure against the program's own, buffers, loss
scales, data positions) and raises ``CheckpointError`` listing every mismatch by level; only a state
that passes is applied, so a refused checkpoint changes nothing.

A level fed by a one-shot iterator (a generator) cannot be rewound or fast-forwarded: it is
restored only when the checkpoint's position is where the live iterator stands (e.g. reloading a
state taken from this program at this step); otherwise the load is refused (``mlodsl.data``).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import pickle
import tempfile

import torch

from dataclasses import dataclass

from .feeder import Feeder
from .tree import tree_map

FORMAT, VERSION = "mlodsl-checkpoint", 1
PLAIN = (bool, int, float, str, type(None))  # the scalars a checkpoint may hold


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved or does not fit the program; nothing was changed."""


@dataclass
class Parts:
    """What a checkpoint reads of a program and restores into it, as the program hands it over.

    Args:
        state: ``{level: {"params", "opt"}}`` as this process holds it (a sharded level: its slice).
        levels: ``{level: Level}``: each level's module (its buffers) and optimizer.
        feeder: the program's batch streams (``mlodsl.feeder``).
        scalers: ``{level: LossScaler}`` of the fp16 levels.
        sharding: the sharded levels (``mlodsl.sharding``), or None.
        distributed: the data-parallel group (``mlodsl.distributed``), or None.
        step: the number of steps taken.
        history: the log rows of the steps taken.
    """

    state: dict
    levels: dict
    feeder: Feeder
    scalers: dict
    sharding: object
    distributed: object
    step: int
    history: list


# -- the state as plain data ----------------------------------------------------------------------
def _plain_opt(opt):
    """An optimizer state with a ``torch.optim`` handle (``ml.optim.from_torch``) as its state dict."""
    if isinstance(opt, dict) and "torch" in opt and hasattr(opt["torch"], "optimizer"):
        return {**opt, "torch": opt["torch"].optimizer.state_dict()}
    return opt


def _plain_row(row: dict) -> dict:
    """A history row as plain data: numpy scalars (which ``weights_only`` cannot load) as Python numbers."""
    def plain(v):
        if isinstance(v, torch.Tensor):
            return v.detach()
        if type(v) in PLAIN:
            return v
        for kind in (bool, int, float):  # subclasses, e.g. numpy.float64
            if isinstance(v, kind):
                return kind(v)
        return v.item() if hasattr(v, "item") else v  # anything else: save names it and refuses
    return {k: plain(v) for k, v in row.items()}


def _buffers(module) -> dict:
    return {k: b.detach() for k, b in module.named_buffers()}


def _as_one(parts: Parts) -> dict:
    """The levels' states as one process holds them: a sharded level's slices gathered (a collective:
    every rank calls it), so that one file loads into a sharded or an unsharded program alike."""
    return parts.state if parts.sharding is None else parts.sharding.full_state(parts.state)


def state_dict(parts: Parts) -> dict:
    """The program's state as plain data (see the module's docstring)."""
    return {"step": parts.step,
            "levels": {n: {"params": dict(s["params"]), "opt": _plain_opt(s["opt"])}
                       for n, s in _as_one(parts).items()},
            "buffers": {n: _buffers(lvl.module) for n, lvl in parts.levels.items()},
            "data": {n: parts.feeder.consumed(n) for n in parts.feeder.streams},
            "loss_scales": {n: sc.state_dict() for n, sc in parts.scalers.items()},
            "rng": torch.get_rng_state(),
            "history": [_plain_row(r) for r in parts.history]}


# -- checking a state against the program --------------------------------------------------------
def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {str(x.dtype).replace('torch.', '')} tensor of shape {tuple(x.shape)}"
    if isinstance(x, dict):
        return f"a dict with keys {sorted(map(str, x))}"
    if isinstance(x, (list, tuple)):
        return f"a {type(x).__name__} of {len(x)}"
    return f"a {type(x).__name__}"


def _tree_mismatches(saved, mine, where: str) -> list:
    """Where ``saved`` differs from ``mine`` in structure, tensor shapes or dtypes."""
    if isinstance(mine, torch.Tensor):
        ok = isinstance(saved, torch.Tensor) and saved.shape == mine.shape and saved.dtype == mine.dtype
    elif isinstance(mine, dict):
        if isinstance(saved, dict) and saved.keys() == mine.keys():
            return [m for k in mine for m in _tree_mismatches(saved[k], mine[k], f"{where}[{k!r}]")]
        ok = False
    elif isinstance(mine, (list, tuple)):
        if isinstance(saved, (list, tuple)) and len(saved) == len(mine):
            return [m for i, (a, b) in enumerate(zip(saved, mine)) for m in _tree_mismatches(a, b, f"{where}[{i}]")]
        ok = False
    else:
        ok = type(saved) is type(mine) or (isinstance(saved, (int, float)) and isinstance(mine, (int, float)))
    return [] if ok else [f"{where} is {_describe(saved)} in the checkpoint but {_describe(mine)} in the program"]


def _named_mismatches(saved: dict, mine: dict, what: str) -> list:
    """Missing, unexpected and differing entries of a ``{name: tensor}`` dict."""
    if not isinstance(saved, dict):
        return [f"its {what}s are {_describe(saved)}, not a dict of tensors"]
    out = [f"{what} '{k}' is missing from the checkpoint" for k in mine if k not in saved]
    out += [f"the checkpoint has an unexpected {what} '{k}'" for k in saved if k not in mine]
    return out + [m for k in mine if k in saved for m in _tree_mismatches(saved[k], mine[k], f"{what} '{k}'")]


def _torch_opt_mismatches(saved, handle) -> list:
    """A ``torch.optim`` state dict against the program's optimizer: groups, and state shaped as the params."""
    mine = handle.optimizer.state_dict()
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
        return [f"its torch.optim state is {_describe(saved)}, not a torch.optim state dict"]
    counts = [len(g.get("params", ())) for g in saved["param_groups"]]
    if counts != [len(g["params"]) for g in mine["param_groups"]]:
        return [f"its torch.optim state has parameter groups of sizes {counts}, the program's "
                f"{[len(g['params']) for g in mine['param_groups']]}"]
    shapes = [p.shape for g in handle.optimizer.param_groups for p in g["params"]]
    out = []
    for i, entry in (saved.get("state") or {}).items():
        for k, v in entry.items():
            if isinstance(v, torch.Tensor) and v.dim() > 0 and (not isinstance(i, int) or v.shape != shapes[i]):
                out.append(f"torch.optim state [{i!r}][{k!r}] has shape {tuple(v.shape)}, not its parameter's")
    return out


def _opt_mismatches(name: str, saved, parts: Parts, state: dict) -> list:
    mine = _plain_opt(state[name]["opt"])
    optimizer = parts.levels[name].optimizer
    if isinstance(mine, dict) and "torch" in mine and isinstance(saved, dict) and saved.keys() == mine.keys():
        return (_tree_mismatches(saved["count"], mine["count"], "optimizer state['count']")
                + _torch_opt_mismatches(saved["torch"], parts.state[name]["opt"]["torch"]))
    found = _tree_mismatches(saved, mine, "optimizer state")
    if found:  # say whose state the program expects: an adam state into an sgd program, say
        found.insert(0, f"its optimizer state does not fit {optimizer!r}")
    return found


def _level_mismatches(parts: Parts, state: dict, name: str, saved: dict) -> list:
    if not isinstance(saved, dict) or not {"params", "opt"} <= saved.keys():
        return [f"its entry is {_describe(saved)}, not {{'params', 'opt'}}"]
    return (_named_mismatches(saved["params"], state[name]["params"], "parameter")
            + _opt_mismatches(name, saved["opt"], parts, state))


def _data_mismatches(feeder: Feeder, name: str, position) -> list:
    if type(position) is not int or position < 0:
        return [f"its data position is {position!r}, not a count of batches"]
    stream = feeder.streams[name]
    if stream.one_shot and position != feeder.consumed(name):
        return [f"its data is a one-shot iterator ({type(stream.data).__name__}) standing after "
                f"{feeder.consumed(name)} batches, which cannot be moved to the checkpoint's {position}: pass a "
                f"list, a re-iterable (e.g. a DataLoader) or a callable as data= to resume it"]
    return []


def _per_level(saved, known, what: str, check) -> list:
    """``saved`` (a dict by level) against the program's levels ``known``: the levels missing or
    extra, then ``check(name, entry)`` of each level both have, prefixed with the level's name."""
    if not isinstance(saved, dict):
        return [f"its {what} are {_describe(saved)}, not a dict by level"]
    missing, extra = sorted(set(known) - set(saved)), sorted(set(saved) - set(known))
    out = [f"{what} of levels {missing} are missing from the checkpoint"] if missing else []
    out += [f"the checkpoint has {what} of levels {extra}, which the program does not have"] if extra else []
    return out + [f"level '{n}': {m}" for n in known if n in saved for m in check(n, saved[n])]


def mismatches(parts: Parts, sd) -> list:
    """Every way ``sd`` does not fit the program, as messages naming the level; empty when it fits."""
    if not isinstance(sd, dict):
        return [f"the state is {_describe(sd)}, not a dict"]
    missing = [k for k in ("step", "levels", "buffers", "data", "loss_scales", "rng", "history") if k not in sd]
    if missing:
        return [f"the state has no {missing} (not a state_dict of this mlodsl version)"]
    state = _as_one(parts)
    out = _per_level(sd["levels"], state, "states", lambda n, s: _level_mismatches(parts, state, n, s))
    out += _per_level(sd["buffers"], parts.levels, "buffers",
                      lambda n, b: _named_mismatches(b, _buffers(parts.levels[n].module), "buffer"))
    out += _per_level(sd["data"], parts.feeder.streams, "data positions",
                      lambda n, pos: _data_mismatches(parts.feeder, n, pos))
    out += _per_level(sd["loss_scales"], parts.scalers, "fp16 loss scales",
                      lambda n, sc: _tree_mismatches(sc, parts.scalers[n].state_dict(), "its fp16 loss scale"))
    if type(sd["step"]) is not int or sd["step"] < 0:
        out.append(f"its step is {sd['step']!r}, not a count")
    out += _tree_mismatches(sd["rng"], torch.get_rng_state(), "the RNG state")
    if not isinstance(sd["history"], list) or not all(isinstance(r, dict) for r in sd["history"]):
        out.append(f"its history is {_describe(sd['history'])}, not a list of dicts")
    return out


# -- applying a state that fits ------------------------------------------------------------------
def _copy_like(saved, mine):
    """A saved tensor on ``mine``'s device, in memory of its own (the caller's dict may change later)."""
    return saved.detach().to(mine.device, copy=True) if isinstance(saved, torch.Tensor) else saved


def _restored_opt(saved, mine):
    if isinstance(mine, dict) and "torch" in mine and hasattr(mine["torch"], "optimizer"):
        mine["torch"].optimizer.load_state_dict(saved["torch"])  # the live torch.optim instance
        return {**saved, "torch": mine["torch"], "count": _copy_like(saved["count"], mine["count"])}
    return tree_map(_copy_like, saved, mine)


def _restored_levels(parts: Parts, levels: dict) -> dict:
    """The saved levels' states, copied onto the program's devices; a sharded level as its slice."""
    state = {n: {"params": {k: _copy_like(v, parts.state[n]["params"][k]) for k, v in s["params"].items()},
                 "opt": _restored_opt(s["opt"], parts.state[n]["opt"])}
             for n, s in levels.items()}
    if parts.sharding is not None:  # every rank read the whole file: each keeps its slice
        state = {n: (parts.sharding.shard_like(s, parts.state[n]) if n in parts.sharding.levels else s)
                 for n, s in state.items()}
    return state


def restore(parts: Parts, sd: dict, source: str = "the state dict") -> Parts:
    """Restore ``sd`` into the program's feeder, modules' buffers, loss scales and torch's RNG, and
    return the parts the program holds itself (state, step, history) as restored; refuse with
    ``CheckpointError``, changing nothing, if it does not fit. The caller then points the user's
    modules at the returned state's parameters."""
    found = mismatches(parts, sd)
    if found:
        raise CheckpointError(f"{source} does not fit the program; nothing was restored:\n  " + "\n  ".join(found))
    # this draws from the data: before any state changes
    streams = {name: parts.feeder.positioned(name, position) for name, position in sd["data"].items()}
    parts.feeder.use(streams)
    state = _restored_levels(parts, sd["levels"])
    with torch.no_grad():
        for n, named in sd["buffers"].items():
            for k, v in named.items():
                parts.levels[n].module.get_buffer(k).copy_(v)
    for n, sc in sd["loss_scales"].items():
        parts.scalers[n].load_state_dict(sc)
    torch.set_rng_state(sd["rng"])
    return Parts(state, parts.levels, parts.feeder, parts.scalers, parts.sharding, parts.distributed,
                 sd["step"], [dict(r) for r in sd["history"]])


# -- files ----------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor):
    """A CPU contiguous tensor's bytes without a copy (``bytes(storage)`` goes element by element)."""
    return (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())


def _feed(h, x, where: str):
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().resolve_conj().resolve_neg().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(_tensor_bytes(t))
    elif type(x) is dict:
        h.update(f"D{len(x)}:".encode())
        for k, v in x.items():
            _feed(h, k, where)
            _feed(h, v, f"{where}[{k!r}]")
    elif type(x) in (list, tuple):
        h.update(f"{type(x).__name__}{len(x)}:".encode())
        for i, v in enumerate(x):
            _feed(h, v, f"{where}[{i}]")
    elif type(x) in PLAIN:
        h.update(f"{type(x).__name__}:{x!r};".encode())
    else:
        raise CheckpointError(f"{where} is a {type(x).__name__}; a checkpoint holds only tensors, numbers, "
                              f"strings, None, lists, tuples and dicts")


def digest(state) -> str:
    """sha256 of ``state``'s structure and contents (every tensor's dtype, shape and bytes)."""
    h = hashlib.sha256()
    _feed(h, state, "state")
    return h.hexdigest()


def save(parts: Parts, path) -> None:
    """Write the program's checkpoint to ``path`` atomically (a temporary file, then a rename); under
    data parallel, rank 0 writes it and every rank waits until it is written."""
    dp = parts.distributed
    if dp is not None and not dp.is_main:
        try:
            if parts.sharding is not None:
                state_dict(parts)  # its gathers are collectives: every rank takes part, rank 0 writes
        finally:
            dp.barrier()
        return
    path = os.fspath(path)
    try:
        state = state_dict(parts)
        try:
            payload = {"format": FORMAT, "version": VERSION, "sha256": digest(state), "state": state}
        except CheckpointError as err:
            raise CheckpointError(f"cannot save checkpoint '{path}': {err}") from None
        _write_atomically(payload, path)
    finally:
        if dp is not None:
            dp.barrier()


def _write_atomically(payload: dict, path: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except OSError as err:  # name the checkpoint, not the temporary file (same errno, same subclass)
        message = f"could not write checkpoint '{path}': {err.strerror or err}"
        raise (OSError(err.errno, message) if err.errno else OSError(message)) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _unpickle(f, path: str):
    """``torch.load`` of plain data only; any failure is a refusal naming ``path``."""
    try:
        return torch.load(f, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err) or "GLOBAL" in str(err):
            raise CheckpointError(f"refused checkpoint '{path}': it holds objects other than plain data "
                                  f"(tensors, numbers, strings, lists, tuples, dicts), which loading could run "
                                  f"as code; it was not written by mlodsl or was tampered with") from None
        raise CheckpointError(f"checkpoint '{path}' is corrupted or truncated: {err}") from None
    except Exception as err:  # a damaged file fails in many ways (zip, pickle, storage), each a refusal
        raise CheckpointError(f"checkpoint '{path}' is corrupted or truncated: {type(err).__name__}: {err}") from None


def read(path) -> dict:
    """The state stored in checkpoint ``path``, after checking that it is plain data and intact."""
    path = os.fspath(path)
    with open(path, "rb") as f:  # a missing or unreadable file fails here, with the OS's message
        payload = _unpickle(f, path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not an mlodsl checkpoint: it has no '{FORMAT}' header (files "
                              f"written before checkpoints carried a checksum cannot be verified, so are not read)")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint '{path}' has format version {payload.get('version')!r}; "
                              f"this mlodsl reads version {VERSION}")
    try:
        intact = digest(payload.get("state")) == payload.get("sha256")
    except CheckpointError:
        intact = False
    if not intact:
        raise CheckpointError(f"checkpoint '{path}' is corrupted: its contents do not match their sha256 checksum")
    return payload["state"]
