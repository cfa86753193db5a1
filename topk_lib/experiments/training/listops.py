"""ListOps trained from scratch with top-k attention (Gupta et al. 2021, section 4.1).

The paper's claim: a model trained with top-k attention reaches the accuracy of a vanilla
one, so the memory saving costs no accuracy. :func:`train_listops` trains the small encoder
classifier of :mod:`topk_lib.nn` (learned positions, mean- or CLS-pooled linear head) whose
every attention layer is :func:`topk_lib.kernels.attention.topk_attention`, so the
memory-efficient backward of that kernel is what trains it; ``k=None`` is exact attention
through the same kernel. Validation accuracy every ``eval_every`` steps gives learning
curves; the final model's test accuracy is reported. :func:`listops_sweep` runs every
(k, seed), each cached (see :mod:`.loop`).

Fairness: every run of a sweep shares seeds, data order, steps and learning-rate schedule;
only k differs.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from topk_lib._validate import optional_k, positive_int
from topk_lib.data import listops
from topk_lib.experiments.training.loop import (autocast, batches, k_label, lr_at, optimizer_step, progress_bar,
                                                 run_record, training_precision)
from topk_lib.nn import Transformer, TransformerConfig

__all__ = ["listops_model", "train_listops", "listops_sweep", "majority_baseline"]


def listops_model(*, max_len: int, k=None, chunk_size: int = 1024, **model_kw) -> Transformer:
    """The ListOps encoder: ``d_model=64, n_heads=4, n_layers=2`` mean-pooled, GELU, unless ``model_kw`` says otherwise."""
    kw = {"d_model": 64, "n_heads": 4, "n_layers": 2, "pool": "mean", **model_kw}
    config = TransformerConfig(vocab_size=len(listops.VOCAB), n_classes=10, max_len=max_len, topk=k,
                               chunk_size=chunk_size, **kw)
    return Transformer(config)


def _accuracy(model, ids, mask, labels, *, batch_size=256, device=torch.device("cpu"), dtype=torch.float32):
    model.eval()
    correct = 0
    with torch.no_grad(), autocast(device, dtype):
        for i in range(0, len(ids), batch_size):
            m = mask[i : i + batch_size]
            width = int(m.sum(1).max())
            logits = model(ids[i : i + batch_size, :width].to(device), m[:, :width].to(device))  # [b, 10]
            correct += int((logits.argmax(-1).cpu() == labels[i : i + batch_size]).sum())
    model.train()
    return correct / max(1, len(ids))


def _encoded(splits, n_eval):
    """Token ids, masks and labels per split; validation and test cut to ``n_eval`` rows."""
    data = {}
    for name, df in splits.items():
        df = df if name == "train" or n_eval is None else df.iloc[:n_eval]
        ids, mask = listops.encode(list(df.expr))  # [N, L], [N, L] with <cls> first
        data[name] = (ids, mask, torch.tensor(df.label.to_numpy(), dtype=torch.long))
    return data


def train_listops(*, splits: dict, k=None, seed: int = 0, steps: int = 300, batch_size: int = 32, lr: float = 1e-3,
                  weight_decay: float = 0.01, warmup: float = 0.1, eval_every: int = 50, n_eval: int | None = None,
                  model_kw: dict | None = None, chunk_size: int = 1024, device=None, dtype=None,
                  progress: bool = True) -> dict:
    """Train :func:`listops_model` with attention top-``k`` on ListOps ``splits`` (see :func:`listops.listops_splits`).

    AdamW, linear warm-up for ``warmup`` of the steps then linear decay, gradient norm
    clipped at 1. Validation accuracy (on the first ``n_eval`` validation examples, all
    when None) every ``eval_every`` steps and at the end; test accuracy of the final model.
    ``device``/``dtype``: see :func:`~topk_lib.experiments.training.loop.training_precision`
    (default: the CPU in float32).
    Returns ``{"k", "seed", "curve": [{"step", "val_acc", "train_loss"}], "test_acc",
    "train_seconds", "seconds_per_step"}``.
    """
    optional_k(k, "k")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every)):
        positive_int(value, name)
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {warmup}")
    missing = {"train", "val", "test"} - set(splits)
    if missing:
        raise ValueError(f"splits must have 'train', 'val' and 'test' DataFrames; missing {sorted(missing)}")
    torch.manual_seed(seed)
    data = _encoded(splits, n_eval)
    max_len = max(d[0].shape[1] for d in data.values())
    device, dtype, _ = training_precision(device, dtype)
    model = listops_model(max_len=max_len, k=k, chunk_size=chunk_size, **(model_kw or {})).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)  # data order: identical for every k
    ids, mask, labels = data["train"]
    curve, losses = [], []
    n_warm = int(warmup * steps)
    model.train()
    start = time.perf_counter()
    bar = progress_bar(steps, f"ListOps k={k_label(k)} seed={seed}", progress)
    for step, idx in enumerate(batches(len(ids), batch_size, steps, gen)):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps=steps, warmup=n_warm, lr=lr)
        m = mask[idx]  # [b, L]
        width = int(m.sum(1).max())  # trim padding shared by the whole batch
        with autocast(device, dtype):
            logits = model(ids[idx, :width].to(device), m[:, :width].to(device))  # [b, 10]
        loss = F.cross_entropy(logits.float(), labels[idx].to(device))
        losses.append(optimizer_step(model, opt, loss))
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val = _accuracy(model, *data["val"], device=device, dtype=dtype)
            curve.append({"step": step + 1, "val_acc": val, "train_loss": sum(losses) / len(losses)})
            losses = []
            bar.set_postfix(val_acc=f"{val:.3f}")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    return {"k": k, "seed": seed, "curve": curve, "test_acc": _accuracy(model, *data["test"], device=device, dtype=dtype),
            "train_seconds": seconds, "seconds_per_step": seconds / steps}


def listops_sweep(*, ks, seeds, data_kw: dict, train_kw: dict | None = None, device=None, dtype=None, root=None,
                  progress: bool = True):
    """Every (k, seed) ListOps run, cached; returns ``(curves, results)`` DataFrames.

    ``data_kw`` goes to :func:`listops.listops_splits`, ``train_kw`` to :func:`train_listops`, which
    runs on ``device`` in ``dtype`` (mixed precision; a run off the CPU or in half precision is cached
    apart from the float32 CPU runs).
    ``results`` has one row per run (``k`` is "full" for exact attention, ``test_acc``,
    ``train_seconds``); ``curves`` one row per evaluation (``step``, ``val_acc``, ``train_loss``).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    train_kw = dict(train_kw or {})
    device, dtype, precision = training_precision(device, dtype)
    splits = None
    rows, curve_rows = [], []
    runs = [(k, s) for k in ks for s in seeds]
    for k, seed in tqdm(runs, desc="ListOps runs", unit="run", disable=not progress):
        config = {"data": data_kw, "train": train_kw, "k": k, "seed": seed, **precision}

        def compute(k=k, seed=seed):
            nonlocal splits
            if splits is None:  # only when something must be trained
                splits = listops.listops_splits(**data_kw, progress=progress)
            return train_listops(splits=splits, k=k, seed=seed, device=device, dtype=dtype, progress=progress, **train_kw)

        rec = run_record("listops", f"k{k_label(k)}_seed{seed}", config=config, compute=compute, root=root,
                         required=("test_acc", "train_seconds", "seconds_per_step", "curve"))
        rows.append({"k": k_label(k), "seed": seed, "test_acc": rec["test_acc"], "train_seconds": rec["train_seconds"],
                     "seconds_per_step": rec["seconds_per_step"]})
        curve_rows += [{"k": k_label(k), "seed": seed, **point} for point in rec["curve"]]
    return pd.DataFrame(curve_rows), pd.DataFrame(rows)


def majority_baseline(splits) -> tuple[int, float]:
    """The training split's most common label and its share of the test split (the trivial baseline)."""
    label = int(splits["train"].label.mode()[0])
    return label, float((splits["test"].label == label).mean())
