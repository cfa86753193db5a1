"""Selector sweeps for notebook 07: which points to measure, and each point's result cached.

A point is ``(label, selector, budget)``; :func:`selector_points` builds them by name. Every
measured point is cached on its own (under ``paths.results() / "selectors"``, keyed by the
model, the input tokens, the selector's ``repr`` and the budget), so a long sweep resumes
where it stopped and a rerun reads files:

* :func:`cached_selector_metrics`: recall, mass and error per layer and head
  (:func:`topk_lib.analysis.selection.selector_metrics`), one CSV per point;
* :func:`selector_perplexity` and :func:`selector_passkey`: downstream, with the selector in
  every layer (:func:`topk_lib.hf.patching.use_sparse`): perplexity of teacher-forced windows
  (a prefill: SnapKV leaves it exact) and passkey retrieval by greedy ``generate``
  (prefill, then decoding), one JSON record per point, tied to the model's weights.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from topk_lib.analysis.selection import selector_metrics
from topk_lib.experiments.sweep import fingerprint, mean_row, model_fingerprint, model_record
from topk_lib.hf.patching import use_sparse
from topk_lib.infra import paths
from topk_lib.infra.cache import cached_frame, digest
from topk_lib.selectors.adaptive import Threshold, TopP
from topk_lib.selectors.base import SelectionLog
from topk_lib.selectors.estimated import DoubleSparsity, Loki, Quest
from topk_lib.selectors.heavy import H2O, SnapKV
from topk_lib.selectors.static import Oracle, RandomKeys, SinkWindow
from topk_lib.tasks import passkey
from topk_lib.tasks.scoring import token_scores

__all__ = ["SELECTOR_NAMES", "selector_points", "cached_selector_metrics", "selector_perplexity", "selector_passkey",
           "point_key"]

#: Names :func:`selector_points` knows, in the order tables list them.
SELECTOR_NAMES = ("oracle", "sink_window", "h2o", "snapkv", "quest", "loki", "double_sparsity", "top_p", "threshold",
                  "random")


def selector_points(names, budgets, *, calibration=None, top_p=(0.5, 0.8, 0.9, 0.95), top_p_cap=None, rank=16,
                    channels=16, page_size=16):
    """``[(label, selector, budget)]``: each named selector at each budget.

    ``top_p`` runs once per mass ``p`` (its budget is the cap ``top_p_cap``, default the largest
    budget x 4); ``loki``, ``double_sparsity`` and ``threshold`` are calibrated on
    ``calibration``, ``{layer: (q, k, v)}`` of another text (needed when they are named).
    ``quest`` skips budgets under one page.
    """
    unknown = [n for n in names if n not in SELECTOR_NAMES]
    if unknown:
        raise ValueError(f"names: unknown selectors {unknown}; choose from {SELECTOR_NAMES}")
    needs = {"loki", "double_sparsity", "threshold"} & set(names)
    if needs and calibration is None:
        raise ValueError(f"{sorted(needs)} need calibration={{layer: (q, k, v)}} of another text (record_qkv)")
    budgets = sorted(int(b) for b in budgets)
    shared = {
        "loki": lambda: Loki(rank=rank).calibrate(calibration),
        "double_sparsity": lambda: DoubleSparsity(channels=channels).calibrate(calibration),
        "threshold": lambda: Threshold().calibrate(calibration, budgets),
    }
    points = []
    for name in names:
        if name == "top_p":
            cap = top_p_cap or 4 * budgets[-1]
            points += [(name, TopP(p), cap) for p in top_p]
            continue
        sel = shared[name]() if name in shared else {
            "oracle": Oracle, "sink_window": SinkWindow, "h2o": H2O, "snapkv": SnapKV, "random": RandomKeys,
            "quest": lambda: Quest(page_size=page_size),
        }[name]()
        points += [(name, sel, b) for b in budgets if name != "quest" or b >= page_size]
    return points


def point_key(selector, budget):
    """A point's identity in cache keys: the selector's ``repr`` (its parameters) and the budget."""
    return {"selector": repr(selector), "budget": int(budget)}


def _stem(label, selector, budget):
    return f"{label}_{digest(repr(selector).encode(), length=6)}_{int(budget)}"


def cached_selector_metrics(records, points, *, steps, model_name, text, calibration_text=None, progress=True):
    """:func:`~topk_lib.analysis.selection.selector_metrics` point by point, each cached.

    ``text`` names the measured text (with its tokens' digest, part of the key);
    ``calibration_text`` the calibration text of calibrated selectors. Returns one frame.
    """
    from tqdm.auto import tqdm

    layers = sorted(records)
    q0 = records[layers[0]][0]
    base = {"model": model_name, "text": text, "length": int(q0.shape[-2]), "steps": int(steps), "layers": layers,
            "activations": digest(q0.float().numpy().tobytes()[:1 << 20], length=12),
            "calibration": calibration_text}
    frames = []
    for label, selector, budget in tqdm(points, desc="selector points", disable=not progress):
        frames.append(cached_frame(
            _stem(label, selector, budget), folder=f"selectors/{model_name}/metrics",
            config={**base, **point_key(selector, budget)},
            compute=lambda s=selector, b=budget, lab=label: selector_metrics(records, [(lab, s, b)], steps=steps,
                                                                            progress=False),
            columns=("selector", "budget", "layer", "head", "recall", "mass", "rel_error", "kept"),
        ).assign(param=repr(selector)))
    return pd.concat(frames, ignore_index=True)


def _record(model, task, label, selector, budget, config, compute):
    mark = {"model_fingerprint": model_fingerprint(model)}

    def job():
        t0 = time.perf_counter()
        out = compute()
        return {"task": task, "label": label, **mark, **out, "seconds": time.perf_counter() - t0}

    return model_record(paths.results() / "selectors" / config["model"] / task / _stem(label, selector, budget),
                        config={**config, **point_key(selector, budget)}, compute=job, mark=mark)


@torch.no_grad()
def selector_perplexity(model, windows, points, *, model_name, chunk_size=1024, progress=True):
    """Perplexity of token ``windows [n, L]`` with each point's selector in every layer; one row per point.

    Columns ``selector, param, budget, perplexity, nll, accuracy, kept`` (mean keys per query).
    """
    from tqdm.auto import tqdm

    config = {"model": model_name, "windows": fingerprint(windows.tolist()), "chunk_size": chunk_size}
    rows = []
    for label, selector, budget in tqdm(points, desc="perplexity", disable=not progress):
        def compute(selector=selector, budget=budget):
            log = SelectionLog()
            with use_sparse(model, selector, budget, chunk_size=chunk_size, log=log):
                nll, correct = token_scores(model, windows)
            return {"nll": float(nll.mean()), "accuracy": float(correct.mean()), "kept": log.mean_budget}

        rec = _record(model, "perplexity", label, selector, budget, config, compute)
        rows.append({"selector": label, "param": repr(selector), "budget": budget, "perplexity": float(np.exp(rec["nll"])),
                     "nll": rec["nll"], "accuracy": rec["accuracy"], "kept": rec["kept"]})
    return pd.DataFrame(rows)


@torch.no_grad()
def selector_passkey(model, tokenizer, points, *, model_name, lengths, depths, n_per_cell=1, seed=0, progress=True):
    """Passkey accuracy with greedy ``generate`` (prefill + decoding) under each point's selector.

    Returns rows ``selector, param, budget, accuracy, lo, hi, n, kept`` (a bootstrap interval over prompts).
    """
    from tqdm.auto import tqdm

    examples = passkey.passkey_examples(tokenizer, lengths=lengths, depths=depths, n_per_cell=n_per_cell, seed=seed)
    config = {"model": model_name, "data": fingerprint([e["input_ids"] for e in examples])}
    device = next(model.parameters()).device
    rows = []
    for label, selector, budget in tqdm(points, desc="passkey", disable=not progress):
        def compute(selector=selector, budget=budget):
            log, correct = SelectionLog(), []
            with use_sparse(model, selector, budget, log=log):
                for ex in examples:
                    ids = torch.tensor([ex["input_ids"][: -ex["answer_len"]]], device=device)
                    out = model.generate(ids, max_new_tokens=ex["answer_len"], min_new_tokens=ex["answer_len"],
                                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
                    correct.append(int(out[0, ids.shape[1]:].tolist() == ex["input_ids"][-ex["answer_len"]:]))
            return {"correct": correct, "kept": log.mean_budget}

        rec = _record(model, "passkey", label, selector, budget, config, compute)
        rows.append({"selector": label, "param": repr(selector), "budget": budget,
                     **{k: v for k, v in mean_row("accuracy", rec["correct"]).items() if k != "metric"},
                     "kept": rec["kept"]})
    return pd.DataFrame(rows).rename(columns={"value": "accuracy"})


def depth_layers(model, fractions=None):
    """Layer numbers at ``fractions`` of the model's depth (0 = first attention layer, 1 = last), sorted, unique.

    ``None`` (or empty) gives every attention layer of the language model.
    """
    from topk_lib.hf.layers import describe_layers

    layers = [info.layer for info in describe_layers(model) if info.attention and info.tower is None]
    if not fractions:
        return layers
    return sorted({layers[round(float(f) * (len(layers) - 1))] for f in fractions})


def selector_texts(tokenizer, *, quick, length):
    """``(text name, ids [1, length], calibration name, calibration ids [1, length])`` from two different texts.

    Full mode measures Moby Dick and calibrates on the State of the Union addresses; quick
    mode takes two windows of CPython's pydoc text.
    """
    from topk_lib.data import moby_dick_text, pydoc_text, sotu_speeches
    from topk_lib.tasks.lm import token_windows

    if quick:
        both = token_windows(tokenizer, pydoc_text(), window=length, n_windows=2)
        return "pydoc", both[:1, :length], "pydoc_other", both[1:, :length]
    ids = token_windows(tokenizer, moby_dick_text(), window=length, n_windows=1)[:, :length]
    sotu = " ".join(s["text"] for s in sotu_speeches()[-20:])
    return "moby_dick", ids, "sotu", token_windows(tokenizer, sotu, window=length, n_windows=1)[:, :length]


def measurable_length(model, length):
    """``length``, or the model's sliding window when shorter (the dense references here see no window)."""
    config = getattr(model.config, "get_text_config", lambda: model.config)()
    window = getattr(config, "sliding_window", None)
    return int(min(length, window)) if window else int(length)


def cached_decode_dynamics(model, prompt, *, model_name, k, steps, blocks):
    """:func:`~topk_lib.analysis.selection.decode_dynamics` of ``prompt [1, L]``, cached by model, tokens and knobs."""
    from topk_lib.analysis.selection import decode_dynamics

    config = {"model": model_name, "prompt": digest(prompt.cpu().numpy().tobytes(), length=12),
              "length": int(prompt.shape[-1]), "k": int(k), "steps": int(steps), "blocks": [int(b) for b in blocks]}
    device = next(model.parameters()).device
    return cached_frame(f"{model_name}_decode_dynamics", folder=f"selectors/{model_name}", config=config,
                        columns=("layer", "head", "metric", "value"),
                        compute=lambda: decode_dynamics(model, prompt.to(device), k=k, steps=steps, blocks=blocks))


def cached_layer_cascade(model, ids, *, model_name, selector, budget, layers):
    """:func:`~topk_lib.analysis.selection.layer_cascade` of ``ids [1, L]``, cached by model, tokens and knobs."""
    from topk_lib.analysis.selection import layer_cascade

    config = {"model": model_name, "tokens": digest(ids.cpu().numpy().tobytes(), length=12),
              "length": int(ids.shape[-1]), **point_key(selector, budget), "layers": [int(i) for i in layers]}
    device = next(model.parameters()).device
    return cached_frame(f"{model_name}_cascade", folder=f"selectors/{model_name}", config=config,
                        columns=("layer_i", "layer_j", "metric", "value"),
                        compute=lambda: layer_cascade(model, ids.to(device), selector=selector, budget=budget,
                                                      layers=layers))
