"""Accuracy versus k: resumable sweeps of the zero-shot tasks under ``use_topk``, with bootstrap CIs.

Gupta et al. (2021, section 4) show that top-k attention and top-k feed-forward layers keep
the accuracy of pretrained models nearly unchanged down to small k, without corrective
training. This module runs that measurement for the tasks of :mod:`topk_lib.tasks.zeroshot`:

* a :class:`Setting` says what is switched: nothing (``vanilla``), attention (one k for
  every layer, or a per-head ``budget``), feed-forward layers (``ff``), or ``both``;
* a sweep runs one task for a list of settings; every (task, setting) result is cached as a
  JSON file under ``paths.results() / "accuracy" / <task>/`` (written atomically, keyed by a
  hash of the task's configuration, the data and the setting), so an interrupted sweep
  resumes where it stopped and a rerun only reads files;
* each sweep returns a tidy DataFrame, one row per (setting, metric), with a 95 % percentile
  bootstrap interval (:func:`bootstrap_ci`) over examples, or over blocks of consecutive
  tokens for language modelling (tokens of one text are not independent).

Also here: the per-head budget helpers (:func:`measure_head_budget`, :func:`scale_budget`),
the closing-note helpers (:func:`smallest_k_within`, :func:`budget_comparison`,
:func:`relative_to_vanilla`) and the paper's published UnifiedQA numbers
(:data:`GUPTA2021_UNIFIEDQA_FF`).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from topk_lib.tasks import zeroshot
from topk_lib.infra import paths
from topk_lib.hf.patching import use_topk

__all__ = [
    "KINDS",
    "Setting",
    "settings_grid",
    "bootstrap_ci",
    "block_sums",
    "run_sweep",
    "lm_sweep",
    "classification_sweep",
    "qa_sweep",
    "passkey_sweep",
    "retrieval_sweep",
    "measure_head_budget",
    "scale_budget",
    "smallest_k_within",
    "budget_comparison",
    "relative_to_vanilla",
    "GUPTA2021_UNIFIEDQA_FF",
    "paper_reference",
]

#: What a setting switches to top-k.
KINDS = ("vanilla", "attention", "ff", "both", "budget")

#: Gupta et al. (2021), "Memory-efficient Transformers via Top-k Attention", arXiv 2106.06899:
#: average exact match of UnifiedQA zero-shot over its QA datasets with top-k in the
#: feed-forward layers only (attention unchanged), as published. ``None`` = not reported.
GUPTA2021_UNIFIEDQA_FF = {
    "T5-base": {"d_ff": 3072, "full": 62.4, "k": {1024: 62.4, 256: 62.3, 128: 62.5, 64: 62.4, 32: 60.9, 16: 58.7}},
    "T5-3B": {"d_ff": 16384, "full": 76.7, "k": {1024: 76.7, 256: 76.5, 128: 76.0, 64: 74.8, 32: 71.8, 16: 64.3}},
    "T5-11B": {"d_ff": 65536, "full": 81.3, "k": {1024: 81.4, 256: 81.0, 128: 79.3, 64: 77.1}},
}


# --------------------------------------------------------------------------- settings


def _k(value, arg):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{arg} must be a positive int or None, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Setting:
    """One point of a sweep. Build with :func:`settings_grid` or the class methods.

    ``attn_k``: None, an int (every layer and head) or, for ``kind="budget"``, a sorted tuple
    of ``((layer, head), k)`` pairs. ``ff_k``: None or an int. ``nominal_k``: the average k a
    budget was scaled to (its real mean after rounding is :attr:`x`).
    """

    kind: str
    attn_k: object = None
    ff_k: int | None = None
    nominal_k: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        need = {"vanilla": (False, False), "attention": (True, False), "ff": (False, True),
                "both": (True, True), "budget": (True, False)}[self.kind]
        if (self.attn_k is not None, self.ff_k is not None) != need:
            raise ValueError(f"a {self.kind!r} setting needs attn_k {'set' if need[0] else 'None'} and "
                             f"ff_k {'set' if need[1] else 'None'}, got attn_k={self.attn_k!r}, ff_k={self.ff_k!r}")
        if self.kind == "budget" and not isinstance(self.attn_k, tuple):
            raise ValueError("a 'budget' setting's attn_k must be a tuple of ((layer, head), k); use Setting.budget")

    @classmethod
    def budget(cls, budget, *, nominal_k=None):
        """A per-head budget ``{(layer, head): k}`` as a setting."""
        if not isinstance(budget, dict) or not budget:
            raise ValueError("budget must be a non-empty {(layer, head): k} dict")
        items = tuple(sorted(((int(l), int(h)), _k(k, f"budget[{(l, h)}]")) for (l, h), k in budget.items()))
        return cls("budget", attn_k=items, nominal_k=None if nominal_k is None else float(nominal_k))

    @property
    def name(self):
        """Short label, also the cache file's stem: ``vanilla``, ``attn8``, ``ff96``, ``attn8_ff96``, ``budget8``."""
        if self.kind == "vanilla":
            return "vanilla"
        if self.kind == "budget":
            return f"budget{self.nominal_k if self.nominal_k is not None else self.x:g}"
        parts = ([f"attn{self.attn_k}"] if self.attn_k is not None else []) + (
            [f"ff{self.ff_k}"] if self.ff_k is not None else [])
        return "_".join(parts)

    @property
    def x(self):
        """The k this setting is plotted at: attention k (budget: its mean), ff k for ``ff``, NaN for vanilla."""
        if self.kind == "vanilla":
            return math.nan
        if self.kind == "ff":
            return float(self.ff_k)
        if self.kind == "budget":
            return float(np.mean([k for _, k in self.attn_k]))
        return float(self.attn_k)

    def topk(self):
        """Keyword arguments for :func:`topk_lib.hf.patching.use_topk`."""
        attn = dict(self.attn_k) if self.kind == "budget" else self.attn_k
        return {"attn_k": attn, "ff_k": self.ff_k}

    def config(self):
        """JSON-able description (part of the cache key)."""
        attn = [[l, h, k] for (l, h), k in self.attn_k] if self.kind == "budget" else self.attn_k
        return {"kind": self.kind, "attn_k": attn, "ff_k": self.ff_k, "nominal_k": self.nominal_k}


def settings_grid(*, attn_ks=(), ff_ks=(), both=(), budgets=None):
    """Vanilla first, then one setting per attention k, ff k, ``(attn_k, ff_k)`` pair and budget.

    ``budgets`` maps a nominal average k to a ``{(layer, head): k}`` budget.
    """
    out = [Setting("vanilla")]
    out += [Setting("attention", attn_k=_k(k, "attn_ks")) for k in attn_ks]
    out += [Setting("ff", ff_k=_k(k, "ff_ks")) for k in ff_ks]
    for pair in both:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"both must hold (attn_k, ff_k) pairs, got {pair!r}")
        out.append(Setting("both", attn_k=_k(pair[0], "both"), ff_k=_k(pair[1], "both")))
    out += [Setting.budget(b, nominal_k=k) for k, b in (budgets or {}).items()]
    if len({s.name for s in out}) != len(out):
        raise ValueError("settings_grid: two settings share a name; remove duplicate ks")
    return out


# --------------------------------------------------------------------------- statistics


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
    block = int(block)
    if block <= 0:
        raise ValueError(f"block must be a positive int, got {block}")
    sums, counts = [], []
    for row in a:
        for s in range(0, row.size, block):
            sums.append(row[s : s + block].sum())
            counts.append(row[s : s + block].size)
    return np.array(sums), np.array(counts, dtype=np.float64)


def _row(metric, estimate, lo, hi, n):
    return {"metric": metric, "value": estimate, "lo": lo, "hi": hi, "n": int(n)}


def _mean_row(metric, values, *, seed=0):
    return _row(metric, *bootstrap_ci(values, seed=seed), len(values))


# --------------------------------------------------------------------------- caching


def _fingerprint(obj):
    """Short content hash of JSON-able data (which examples a sweep scored)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:12]


def run_sweep(task, settings, *, config, compute, progress=True, root=None):
    """``compute(setting) -> dict`` for every setting, each cached; returns the records in order.

    A record is read from ``root / task / f"{setting.name}_{hash}.json"`` when present (``root``
    defaults to ``paths.results() / "accuracy"``, read at call time); the hash covers ``config``
    and the setting. Computed records get ``seconds`` (wall time); every returned record has
    ``computed`` (False when it came from the cache).
    """
    from tqdm.auto import tqdm

    from topk_lib.infra.cache import cached_record

    settings = list(settings)
    if not settings or not all(isinstance(s, Setting) for s in settings):
        raise ValueError("settings must be a non-empty list of Setting (see settings_grid)")
    root = paths.results() / "accuracy" if root is None else root
    records = []
    bar = tqdm(settings, desc=task, unit="setting", disable=not progress)
    for setting in bar:
        bar.set_postfix_str(setting.name)
        computed = []

        def job(setting=setting):
            t0 = time.perf_counter()
            out = compute(setting)
            computed.append(True)
            return {**out, "seconds": time.perf_counter() - t0}

        key = {**config, "setting": setting.config()}
        header = {"task": task, "name": setting.name, "config": key}  # the record starts with what produced it
        rec = cached_record(Path(root) / task / setting.name, config=key,
                            compute=lambda job=job, header=header: {**header, **job()})
        records.append({**rec, "computed": bool(computed)})
    return records


def _frame(task, settings, records, rows_of):
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


def _check_name(value, arg):
    if not isinstance(value, str) or not value or "/" in value:
        raise ValueError(f"{arg} must be a non-empty string without '/', got {value!r}")
    return value


# --------------------------------------------------------------------------- task sweeps


def lm_sweep(model, tokenizer, text, *, model_name, corpus, settings, window=1024, n_windows=4, block=64,
             chunk_size=1024, progress=True, root=None):
    """Perplexity and next-token accuracy on ``n_windows`` windows of ``window`` tokens of ``text``.

    Windows come from :func:`topk_lib.tasks.lm.token_windows` (evenly spread, disjoint). The
    task is ``lm_{corpus}_{window}``; intervals resample blocks of ``block`` tokens.
    Metrics: ``perplexity``, ``accuracy`` (top-1 next token).
    """
    from topk_lib.tasks.lm import token_windows

    corpus = _check_name(corpus, "corpus")
    windows = token_windows(tokenizer, text, window=window, n_windows=n_windows)  # [n, W]
    task = f"lm_{corpus}_{window}"
    config = {"model": model_name, "data": _fingerprint(windows.tolist()), "window": window, "n_windows": n_windows,
              "chunk_size": chunk_size}

    def compute(setting):
        with use_topk(model, **setting.topk(), chunk_size=chunk_size):
            nll, ok = zeroshot.token_scores(model, windows, progress=progress)
        return {"nll": np.round(nll, 5).tolist(), "correct": ok.astype(int).tolist()}

    records = run_sweep(task, settings, config=config, compute=compute, progress=progress, root=root)

    def rows_of(rec):
        nll_s, counts = block_sums(rec["nll"], block=block)
        ok_s, _ = block_sums(rec["correct"], block=block)
        return [_row("perplexity", *bootstrap_ci(nll_s, weights=counts, transform=np.exp), counts.sum()),
                _row("accuracy", *bootstrap_ci(ok_s, weights=counts), counts.sum())]

    return _frame(task, settings, records, rows_of)


def classification_sweep(model, tokenizer, examples, *, model_name, task, template, labels, settings,
                         content_free=zeroshot.CONTENT_FREE, batch_size=16, chunk_size=1024, progress=True, root=None):
    """Zero-shot classification of ``[(text, label)]`` by label words, with contextual calibration.

    Content-free scores are recomputed under every setting (the model changes with k).
    Metrics: ``accuracy`` (calibrated), ``accuracy_raw`` (uncalibrated).
    """
    task = _check_name(task, "task")
    examples = [(str(t), str(l)) for t, l in examples]
    config = {"model": model_name, "data": _fingerprint(examples), "template": template, "labels": labels,
              "content_free": list(content_free), "chunk_size": chunk_size}

    def compute(setting):
        with use_topk(model, **setting.topk(), chunk_size=chunk_size):
            out = zeroshot.classify(model, tokenizer, examples, template=template, labels=labels,
                                    content_free=content_free, batch_size=batch_size, progress=progress)
        return out

    records = run_sweep(task, settings, config=config, compute=compute, progress=progress, root=root)

    def rows_of(rec):
        gold = np.array(rec["label"])
        return [_mean_row("accuracy", (np.array(rec["calibrated"]) == gold).astype(float)),
                _mean_row("accuracy_raw", (np.array(rec["raw"]) == gold).astype(float))]

    return _frame(task, settings, records, rows_of)


def qa_sweep(model, tokenizer, pairs, *, model_name, settings, task="trivia", system=zeroshot.QA_SYSTEM,
             max_new_tokens=24, batch_size=16, chunk_size=1024, progress=True, root=None):
    """Greedy answers to ``[(question, answer)]`` under decode-time top-k (KV cache).

    Metrics: ``contains`` (normalised gold answer inside the generated text), ``exact``
    (normalised exact match of the first line).
    """
    task = _check_name(task, "task")
    pairs = [(str(q), str(a)) for q, a in pairs]
    prompts = zeroshot.qa_prompts(tokenizer, [q for q, _ in pairs], system=system)
    config = {"model": model_name, "data": _fingerprint([prompts, [a for _, a in pairs]]),
              "max_new_tokens": max_new_tokens, "chunk_size": chunk_size}

    def compute(setting):
        with use_topk(model, **setting.topk(), chunk_size=chunk_size):
            answers = zeroshot.generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                batch_size=batch_size, progress=progress)
        scores = [zeroshot.answer_scores(p, a) for p, (_, a) in zip(answers, pairs)]
        return {"answers": answers, "exact": [int(e) for e, _ in scores], "contains": [int(c) for _, c in scores]}

    records = run_sweep(task, settings, config=config, compute=compute, progress=progress, root=root)

    def rows_of(rec):
        return [_mean_row("contains", rec["contains"]), _mean_row("exact", rec["exact"])]

    return _frame(task, settings, records, rows_of)


def passkey_sweep(model, tokenizer, *, model_name, settings, lengths, depths, n_per_cell=1, seed=0,
                  chunk_size=1024, progress=True, root=None):
    """Passkey retrieval accuracy (greedy decoding returns the whole key), per length and pooled.

    Rows: task ``passkey_{length}`` for each length, and ``passkey`` over all prompts.
    Metrics: ``accuracy`` (whole key right) and ``digits`` (share of answer tokens right).
    """
    from tqdm.auto import tqdm

    examples = zeroshot.passkey_examples(tokenizer, lengths=lengths, depths=depths, n_per_cell=n_per_cell, seed=seed)
    task = "passkey"
    config = {"model": model_name, "data": _fingerprint([e["input_ids"] for e in examples]), "chunk_size": chunk_size}

    def compute(setting):
        correct, digits = [], []
        with use_topk(model, **setting.topk(), chunk_size=chunk_size):
            for ex in tqdm(examples, desc="passkeys", disable=not progress, leave=False):
                pred = zeroshot.greedy_continuation(model, ex["input_ids"], answer_len=ex["answer_len"])
                answer = ex["input_ids"][-ex["answer_len"]:]
                correct.append(int(pred == answer))
                digits.append(float(np.mean([p == a for p, a in zip(pred, answer)])))
        return {"length": [e["length"] for e in examples], "depth": [e["depth"] for e in examples],
                "tokens": [e["n_tokens"] for e in examples], "correct": correct, "digits": digits}

    records = run_sweep(task, settings, config=config, compute=compute, progress=progress, root=root)

    def rows_of(rec):
        lengths_ = np.array(rec["length"])
        correct, digits = np.array(rec["correct"], float), np.array(rec["digits"])
        rows = []
        for length in sorted(set(lengths_.tolist())):
            sel = lengths_ == length
            rows += [{**_mean_row("accuracy", correct[sel]), "task": f"passkey_{length}"},
                     {**_mean_row("digits", digits[sel]), "task": f"passkey_{length}"}]
        return rows + [_mean_row("accuracy", correct), _mean_row("digits", digits)]

    return _frame(task, settings, records, rows_of)


def retrieval_sweep(model, tokenizer, pairs, *, model_name, settings, task="sotu_retrieval", max_length=256,
                    batch_size=32, chunk_size=1024, progress=True, root=None):
    """Paragraph retrieval with sentence embeddings (:func:`topk_lib.hf.loading.embed`).

    Every query is ranked against all documents. Metrics: ``acc@1``, ``mrr`` and
    ``cosine`` (per pair, the mean of the query's and the document's cosine similarity to
    their vanilla embeddings; 1 for vanilla).
    """
    from topk_lib.hf.loading import embed

    task = _check_name(task, "task")
    pairs = [(str(q), str(d)) for q, d in pairs]
    queries, docs = [q for q, _ in pairs], [d for _, d in pairs]
    config = {"model": model_name, "data": _fingerprint(pairs), "max_length": max_length, "chunk_size": chunk_size}
    reference = {}  # vanilla embeddings, computed once and only when a setting needs them

    def encode(texts, setting):
        with use_topk(model, **setting.topk(), chunk_size=chunk_size):
            return embed(model, tokenizer, texts, max_length=max_length, batch_size=batch_size)  # [N, dim]

    def compute(setting):
        q, d = encode(queries, setting), encode(docs, setting)
        if setting.kind == "vanilla":
            reference.update(q=q, d=d)
        if not reference:
            vanilla = Setting("vanilla")
            reference.update(q=encode(queries, vanilla), d=encode(docs, vanilla))
        cos = (torch.nn.functional.cosine_similarity(q, reference["q"], dim=-1)
               + torch.nn.functional.cosine_similarity(d, reference["d"], dim=-1)) / 2  # [N]
        return {"rank": zeroshot.retrieval_ranks(q, d).tolist(), "cosine": cos.double().tolist()}

    records = run_sweep(task, settings, config=config, compute=compute, progress=progress, root=root)

    def rows_of(rec):
        rank = np.array(rec["rank"], dtype=float)
        return [_mean_row("acc@1", (rank == 1).astype(float)), _mean_row("mrr", 1 / rank),
                _mean_row("cosine", rec["cosine"])]

    return _frame(task, settings, records, rows_of)


# --------------------------------------------------------------------------- per-head budget


def measure_head_budget(model, tokenizer, text, *, n_tokens=1024, frac=0.99, statistic="median", progress=True):
    """``{(layer, head): k}``: the k each head needs to keep ``frac`` of its attention mass.

    One window of ``n_tokens`` tokens from the start of ``text`` runs through
    :func:`topk_lib.analysis.capture.capture_attention_stats`; per head, the ``statistic``
    (``"median"`` or ``"mean"``) over its query rows of the smallest k with mass >= ``frac``,
    rounded up. Use a text the budget is not evaluated on.
    """
    from topk_lib.tasks.lm import token_windows

    try:
        from topk_lib.analysis.capture import capture_attention_stats
    except ImportError as err:  # capture.py arrives with notebooks 01/02
        raise ImportError(f"measure_head_budget needs topk_lib.analysis.capture (per-head statistics): {err}") from err
    if statistic not in ("median", "mean"):
        raise ValueError(f"statistic must be 'median' or 'mean', got {statistic!r}")
    ids = token_windows(tokenizer, text, window=n_tokens, n_windows=1)  # [1, n_tokens]
    stats = capture_attention_stats(model, ids, ks=(1,), fracs=(frac,), progress=progress)
    name = f"k{100 * frac:g}_{statistic}"
    table = stats[(stats.metric == name) & (stats.bucket == "all")]
    if table.empty:
        raise ValueError(f"capture_attention_stats returned no {name!r} rows for bucket 'all'")
    return {(int(l), int(h)): max(1, math.ceil(v)) for l, h, v in zip(table["layer"], table["head"], table["value"])}


def scale_budget(budget, *, average_k, max_k=None):
    """The budget's per-head proportions rescaled to mean ``average_k`` (experiments.per_head_budget)."""
    from topk_lib.experiments.inputs import per_head_budget

    if not isinstance(budget, dict) or not budget:
        raise ValueError("budget must be a non-empty {(layer, head): k} dict")
    table = pd.DataFrame([{"layer": l, "head": h, "value": float(k)} for (l, h), k in budget.items()])
    return per_head_budget(table, average_k=average_k, min_k=1, max_k=max_k)


# --------------------------------------------------------------------------- summaries


def _vanilla(df, task, metric):
    v = df[(df.task == task) & (df.metric == metric) & (df.kind == "vanilla")]
    if v.empty:
        raise ValueError(f"no vanilla row for task {task!r}, metric {metric!r}: every sweep needs a vanilla setting")
    return float(v.value.iloc[0])


def smallest_k_within(summary, *, metric, kind, points=0.01, relative=None, lower_is_better=False):
    """Per task, the smallest k of ``kind`` such that it and every larger k stay within tolerance.

    Tolerance: ``relative`` (e.g. 0.02 = 2 % relative) when given, else ``points`` absolute
    (0.01 = 1 point of accuracy); only a worse value counts. Point estimates, not intervals.
    Columns ``task, vanilla, k, value`` (k is <NA> when even the largest k fails).
    """
    df = summary[summary.metric == metric]
    rows = []
    for task in dict.fromkeys(df.task):
        base = _vanilla(df, task, metric)
        pts = df[(df.task == task) & (df.kind == kind)].sort_values("x", ascending=False)
        if pts.empty:
            continue
        allow = base * relative if relative is not None else points
        ok = (pts.value <= base + allow) if lower_is_better else (pts.value >= base - allow)
        k, value = pd.NA, math.nan
        for x, good, v in zip(pts.x, ok, pts.value):
            if not good:
                break
            k, value = int(x), float(v)
        rows.append({"task": task, "vanilla": base, "k": k, "value": value})
    out = pd.DataFrame(rows, columns=["task", "vanilla", "k", "value"])
    out["k"] = out["k"].astype("Int64")
    return out


def budget_comparison(summary, *, metric):
    """Per task and nominal average k: uniform attention k against the per-head budget.

    Columns ``task, average_k, budget_mean_k, uniform, budget, gain`` (``budget - uniform``;
    positive means the budget is better for accuracy-like metrics).
    """
    df = summary[summary.metric == metric]
    rows = []
    for _, b in df[df.kind == "budget"].iterrows():
        u = df[(df.task == b.task) & (df.kind == "attention") & (df.x == b.nominal_k)]
        if u.empty:
            continue
        rows.append({"task": b.task, "average_k": b.nominal_k, "budget_mean_k": b.x,
                     "uniform": float(u.value.iloc[0]), "budget": float(b.value),
                     "gain": float(b.value) - float(u.value.iloc[0])})
    return pd.DataFrame(rows, columns=["task", "average_k", "budget_mean_k", "uniform", "budget", "gain"])


def relative_to_vanilla(summary, *, metrics, kind="ff", d_ff=1536):
    """Rows of ``kind`` as ``value / vanilla`` against ``k / d_ff``; ``metrics`` maps task -> metric."""
    rows = []
    for task, metric in metrics.items():
        df = summary[(summary.task == task) & (summary.metric == metric)]
        if df.empty:
            continue
        base = _vanilla(df, task, metric)
        for _, r in df[df.kind == kind].iterrows():
            rows.append({"task": task, "metric": metric, "k": r.x, "k_frac": r.x / d_ff,
                         "relative": r.value / base if base else math.nan})
    return pd.DataFrame(rows, columns=["task", "metric", "k", "k_frac", "relative"])


def paper_reference():
    """:data:`GUPTA2021_UNIFIEDQA_FF` as rows ``model, d_ff, k, k_frac, exact_match, relative``."""
    rows = []
    for model, rec in GUPTA2021_UNIFIEDQA_FF.items():
        for k, em in sorted(rec["k"].items()):
            rows.append({"model": model, "d_ff": rec["d_ff"], "k": k, "k_frac": k / rec["d_ff"],
                         "exact_match": em, "relative": em / rec["full"]})
    return pd.DataFrame(rows)
