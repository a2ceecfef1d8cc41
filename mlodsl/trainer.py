"""``prog.fit``: steps in a loop, with validation, callbacks and a progress bar."""
from __future__ import annotations


def fit(prog, iters: int, *, validate=None, every=None, callbacks=(), progress=True) -> list:
    """Run ``iters`` steps of ``prog`` with a tqdm bar of the losses; returns ``prog.history``.

    ``validate(prog)`` returns a number or a dict of numbers, logged as ``val``/``val/<key>``
    every ``every`` steps (default: after the last step). A callback ``cb(prog, row)`` runs after
    every step, on rank 0 under data parallel; returning ``True`` stops the fit (on every rank).
    """
    dp = prog.distributed
    main = dp is None or dp.is_main
    progress = progress and main
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(range(iters), desc="fit")
    else:
        bar = range(iters)
    for it in bar:
        row = prog.step()
        if validate is not None and ((every and (it + 1) % every == 0) or it + 1 == iters):
            val = validate(prog)
            row.update({"val": float(val)} if not isinstance(val, dict)
                       else {f"val/{k}": float(v) for k, v in val.items()})
        if progress:
            bar.set_postfix({k: f"{v:.4g}" for k, v in row.items()
                             if k != "step" and isinstance(v, float)}, refresh=False)
        stop = main and any(cb(prog, row) is True for cb in callbacks)  # callbacks run on rank 0
        if dp is not None:
            stop = dp.any(stop)
        if stop:
            break
    return prog.history
