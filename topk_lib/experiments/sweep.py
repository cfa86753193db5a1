"""Resumable sweeps over settings: each (task, setting) result cached, with bootstrap intervals.

A sweep runs one task for a list of :class:`~topk_lib.experiments.settings.Setting`; every
(task, setting) result is cached as a JSON file under ``paths.results() / "accuracy" /
<task>/`` (written atomically, keyed by a hash of the task's configuration, the data and
the setting), so an interrupted sweep resumes where it stopped and a rerun only reads
files. Results become a tidy DataFrame, one row per (setting, metric), with a 95 %
percentile bootstrap interval (:func:`bootstrap_ci`) over examples, or over blocks of
consecutive tokens (:func:`block_sums`) for language modelling, where the tokens of one
text are not independent.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from topk_lib._validate import positive_int
from topk_lib.experiments.settings import Setting
from topk_lib.infra import paths
from topk_lib.infra.cache import CacheWarning, CorruptCacheError, cached_record, config_key, read_record

__all__ = ["bootstrap_ci", "block_sums", "run_sweep", "model_record", "fingerprint", "model_fingerprint", "metric_row", "mean_row",
           "tidy_frame", "check_name", "KEY_LENGTH"]

#: Characters of the setting-and-config hash in a cache file name (``attn8_1ffcdafaf7.json``).
KEY_LENGTH = 10


def bootstrap_ci(values, *, weights=None, transform=None, n_resamples=2000, level=0.95, seed=0):
    """``(estimate, lo, hi)``: percentile bootstrap of ``sum(values) / sum(weights)``.

    Units (rows of ``values``) are resampled with replacement ``n_resamples`` times. Without
    ``weights`` the statistic is the mean; with them a ratio (e.g. per-block NLL sums over
    per-block token counts). ``transform`` is applied to the estimate and every resample
    (``np.exp`` turns mean NLL into perplexity). Deterministic in ``seed``.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("values must hold at least one unit")
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.shape != v.shape:
        raise ValueError(f"weights must have one entry per value, got {w.shape} for {v.shape}")
    if w.sum() <= 0:
        raise ValueError("weights must have a positive sum")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    n_resamples = int(n_resamples)
    if n_resamples <= 0:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    f = transform or (lambda a: a)
    estimate = float(f(v.sum() / w.sum()))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, v.size, size=(n_resamples, v.size))  # [R, n]
    with np.errstate(invalid="ignore", divide="ignore"):
        stats = f(v[idx].sum(1) / w[idx].sum(1))  # [R]
    stats = stats[np.isfinite(stats)]
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return estimate, float(lo), float(hi)


def block_sums(per_token, *, block):
    """``(sums, counts)`` over blocks of ``block`` consecutive tokens, never crossing a window (row)."""
    a = np.asarray(per_token, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"per_token must be [n_windows, tokens], got shape {a.shape}")
    block = positive_int(block, "block")
    sums, counts = [], []
    for row in a:
        for s in range(0, row.size, block):
            sums.append(row[s : s + block].sum())
            counts.append(row[s : s + block].size)
    return np.array(sums), np.array(counts, dtype=np.float64)


def metric_row(metric, estimate, lo, hi, n):
    """One tidy metric row: point estimate, interval and the number of units."""
    return {"metric": metric, "value": estimate, "lo": lo, "hi": hi, "n": int(n)}


def mean_row(metric, values, *, seed=0):
    """:func:`metric_row` of the mean of per-example ``values`` with its bootstrap interval."""
    return metric_row(metric, *bootstrap_ci(values, seed=seed), len(values))


def fingerprint(obj):
    """Short content hash of JSON-able data (which examples a sweep scored): 12 hex characters.

    Non-ASCII text is hashed as UTF-8 (``ensure_ascii=False``), as the published caches were.
    """
    return config_key(obj, length=12, ensure_ascii=False)


#: Values read from each parameter tensor by :func:`model_fingerprint`: this many from each end
#: and this many more evenly spaced in between.
_SAMPLE = 8


def model_fingerprint(model) -> dict:
    """What identifies a model's numbers beyond its name: ``{"dtype", "device", "weights"}``.

    ``dtype`` and ``device`` (the device type, ``"cpu"`` or ``"cuda"``) list what the
    parameters hold; ``weights`` is 16 hex characters of a sha256 over every parameter's
    name, shape and dtype and a fixed sample of its values (the first and last few and
    some evenly spaced between), read exactly, without arithmetic, so the same weights
    give the same hash on any machine. It costs a few milliseconds: a bfloat16 copy,
    other weights, or fine-tuned ones give another fingerprint, a weight changed only
    outside the sample does not.
    """
    import torch

    h = hashlib.sha256()
    dtypes, devices = set(), set()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        n = flat.numel()
        picks = torch.cat([torch.arange(min(n, _SAMPLE)), torch.arange(_SAMPLE) * (n - 1) // (_SAMPLE - 1),
                           torch.arange(max(0, n - _SAMPLE), n)]) if n else torch.zeros(0, dtype=torch.long)
        values = flat[picks.to(flat.device)].cpu().to(torch.float64)  # exact: every float dtype fits float64
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype};".encode())
        h.update(values.numpy().tobytes())
        dtypes.add(str(p.dtype).removeprefix("torch."))
        devices.add(p.device.type)
    return {"dtype": "+".join(sorted(dtypes)), "device": "+".join(sorted(devices)), "weights": h.hexdigest()[:16]}


def _stored_fingerprint(path):
    """The ``model_fingerprint`` of the readable record at ``path``; None when absent or unreadable."""
    try:
        return read_record(path).get("model_fingerprint")
    except (FileNotFoundError, CorruptCacheError):
        return None  # cached_record reports a corrupt file and recomputes it


def model_record(stem, *, config, compute, mark, key_length=KEY_LENGTH, required=()):
    """:func:`~topk_lib.infra.cache.cached_record` of a result tied to the model that computed it.

    ``mark`` is ``{}`` (no model given: any record is used) or ``{"model_fingerprint":
    model_fingerprint(model)}``, which ``compute()`` stores in the record. A record holding
    another fingerprint is not used: a :class:`~topk_lib.infra.cache.CacheWarning` names it
    and this model's result goes to ``f"{stem}_{hash}_{fingerprint hash}.json"`` beside it, so
    neither model's measurement replaces the other's. Records without a fingerprint (written
    before fingerprints were stored) are used as they are.
    """
    stem, cache_key = Path(stem), config
    if mark:
        plain = stem.with_name(f"{stem.name}_{config_key(config, length=key_length)}.json")
        other = _stored_fingerprint(plain)
        if other is not None and other != mark["model_fingerprint"]:
            stem, cache_key = plain.with_suffix(""), mark["model_fingerprint"]
            warnings.warn(f"cache {plain} holds the results of another model ({other}), not of this one "
                          f"({mark['model_fingerprint']}); using {stem.name}_{config_key(cache_key)}.json",
                          CacheWarning, stacklevel=3)

    def validate(rec):
        stored = rec.get("model_fingerprint")
        if not mark or stored is None or stored == mark["model_fingerprint"]:
            return None
        return f"it was computed for another model ({stored}, this one is {mark['model_fingerprint']})"

    return cached_record(stem, config=cache_key, compute=compute, key_length=key_length, validate=validate,
                         required=required)


def run_sweep(task, settings, *, config, compute, progress=True, root=None, required=(), model=None):
    """``compute(setting) -> dict`` for every setting, each cached; returns the records in order.

    A record is read from ``root / task / f"{setting.name}_{hash}.json"`` when present (``root``
    defaults to ``paths.results() / "accuracy"``, read at call time); the 10-character hash
    (:func:`topk_lib.infra.cache.config_key`) covers ``config`` and the setting. A computed
    record holds ``task``, ``name``, ``config``, ``model_fingerprint`` (of ``model``, when
    given), what ``compute`` returned and ``seconds`` (wall time); every returned record also
    has ``computed`` (False when it came from the cache). A cached record that is cut or lacks
    one of those keys or of ``required`` (the keys the caller reads) is reported with its path
    and recomputed.

    ``model`` ties the records to the weights: a record whose stored
    :func:`model_fingerprint` differs (a bfloat16 copy, other weights under the same
    ``model_name``) is not used (:func:`model_record`).
    """
    from tqdm.auto import tqdm

    settings = list(settings)
    if not settings or not all(isinstance(s, Setting) for s in settings):
        raise ValueError("settings must be a non-empty list of Setting (see settings_grid)")
    root = paths.results() / "accuracy" if root is None else root
    mark = {} if model is None else {"model_fingerprint": model_fingerprint(model)}
    records = []
    bar = tqdm(settings, desc=task, unit="setting", disable=not progress)
    for setting in bar:
        bar.set_postfix_str(setting.name)
        key = {**config, "setting": setting.config()}
        computed = []

        def job(setting=setting, key=key):
            t0 = time.perf_counter()
            out = compute(setting)
            computed.append(True)
            return {"task": task, "name": setting.name, "config": key, **mark, **out,
                    "seconds": time.perf_counter() - t0}

        rec = model_record(root / task / setting.name, config=key, compute=job, mark=mark, key_length=KEY_LENGTH,
                           required=("task", "name", "config", *required))
        records.append({**rec, "computed": bool(computed)})
    return records


def tidy_frame(task, settings, records, rows_of):
    """Tidy rows: setting columns + ``rows_of(record)`` metric rows (each may set its own ``task``)."""
    rows = []
    for s, rec in zip(settings, records):
        base = {
            "sweep": task,
            "task": task,
            "kind": s.kind,
            "setting": s.name,
            "attn_k": s.attn_k if isinstance(s.attn_k, int) else None,
            "ff_k": s.ff_k,
            "x": s.x,
            "nominal_k": s.nominal_k,
            "seconds": rec.get("seconds", math.nan),
            "computed": rec["computed"],
        }
        rows += [{**base, **r} for r in rows_of(rec)]
    df = pd.DataFrame(rows)
    for col in ("attn_k", "ff_k"):
        df[col] = df[col].astype("Int64")
    cols = ["sweep", "task", "kind", "setting", "attn_k", "ff_k", "x", "nominal_k", "metric", "value", "lo", "hi",
            "n", "seconds", "computed"]
    return df[cols]


def check_name(value, arg):
    """A task or corpus name: a non-empty string without ``/`` (it names a folder)."""
    if not isinstance(value, str):
        raise TypeError(f"{arg} must be a non-empty string without '/', got {value!r}")
    if not value or "/" in value:
        raise ValueError(f"{arg} must be a non-empty string without '/', got {value!r}")
    return value
