"""MiniLM fine-tuned on SpamAssassin with top-k attention and feed-forward layers (Gupta et al. 2021, section 4.3).

all-MiniLM-L6-v2 plus a linear head on mean-pooled token states (:class:`SpamClassifier`) is
trained inside :func:`topk_lib.hf.patching.use_topk` (attention top-k and/or feed-forward
top-k), then evaluated under the same setting (:func:`finetune_spam`). The vanilla runs also
evaluate the *swap without training*: the vanilla fine-tuned model tested under each top-k
setting. :func:`finetune_sweep` runs every (setting, seed), each cached (see :mod:`.loop`).

Fairness: every run of a sweep shares seeds, data order, steps and learning-rate schedule;
only k differs. MiniLM's attention-probability dropout is switched off in all runs, because
the patched (top-k) attention has none and the vanilla runs should not differ in that.
Hidden-state dropout stays on everywhere.

The SpamAssassin split (:func:`spam_split`) is fixed by a hash of each email's content, so it
does not depend on row order, and exact duplicates (the corpus has some) always land in the
same split. Input text is ``subject + blank line + body``; all other headers are dropped (see
:func:`spam_text`).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from topk_lib._validate import optional_k, positive_int
from topk_lib.experiments.training.loop import (autocast, batches, k_label, lr_at, optimizer_step, progress_bar,
                                                 run_record, training_precision)
from topk_lib.experiments.sweep import model_fingerprint
from topk_lib.infra.cache import config_key, digest

__all__ = ["spam_text", "spam_split", "SpamClassifier", "finetune_spam", "finetune_sweep", "BASE_MODEL"]

#: The pretrained encoder every run starts from unless ``model`` says otherwise.
BASE_MODEL = "minilm-l6"


def spam_text(subject: str, body: str) -> str:
    """The model input of one email: its subject, a blank line, its body.

    The subject is written by the sender, like the body, so it is content. The other
    headers are dropped: ``Received``, ``Message-Id``, list and date headers identify the
    mailing lists and collection dates the ham and spam folders came from, so a classifier
    could learn the folder instead of the message, and they would fill the token budget.
    """
    subject = (subject or "").strip()
    return f"{subject}\n\n{body}" if subject else body


def spam_split(df, *, val_frac: float = 0.1, test_frac: float = 0.2):
    """The fixed split: a copy of ``df`` with ``split`` ("train" | "val" | "test") and ``y`` (1 = spam).

    Each email goes by the first 8 bytes of SHA-256 of its ``spam_text`` read as a fraction
    u in [0, 1): test if u < test_frac, val if u < test_frac + val_frac, else train. The
    result does not depend on row order, and identical emails share a split.
    """
    if not (0 < test_frac < 1 and 0 <= val_frac < 1 and test_frac + val_frac < 1):
        raise ValueError(f"val_frac ({val_frac}) and test_frac ({test_frac}) must be fractions that sum below 1")
    for col in ("subject", "text", "label"):
        if col not in df.columns:
            raise ValueError(f"df must have a {col!r} column (as from topk_lib.data.spam_assassin())")
    out = df.copy()
    out["input"] = [spam_text(s, t) for s, t in zip(out.subject, out.text)]
    # 16 hex digits = the digest's first 8 bytes, big-endian
    u = [int(digest(x.encode("utf-8", "replace"), length=16), 16) / 2.0**64 for x in out.input]
    out["split"] = ["test" if x < test_frac else "val" if x < test_frac + val_frac else "train" for x in u]
    out["y"] = (out.label == "spam").astype(int)
    return out


class SpamClassifier(nn.Module):
    """A pretrained encoder plus dropout and a linear head on its mean-pooled token states."""

    def __init__(self, encoder, *, n_classes=2, dropout=0.1):
        super().__init__()
        self.encoder = encoder
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, L, D]
        w = attention_mask.unsqueeze(-1).to(h.dtype)  # [B, L, 1]
        pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)  # [B, D]
        return self.head(self.drop(pooled))  # [B, n_classes]


def _binary_metrics(pred, y):
    tp = int(((pred == 1) & (y == 1)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"acc": float((pred == y).float().mean()), "f1": f1}


def _evaluate(model, enc, y, *, attn_k, ff_k, chunk_size, batch_size=64, device=torch.device("cpu"),
              dtype=torch.float32):
    from topk_lib.hf.patching import use_topk

    model.eval()
    preds = []
    with torch.no_grad(), autocast(device, dtype), use_topk(model.encoder, attn_k=attn_k, ff_k=ff_k,
                                                            chunk_size=chunk_size):
        for i in range(0, len(y), batch_size):
            m = enc["attention_mask"][i : i + batch_size]
            width = int(m.sum(1).max())
            logits = model(enc["input_ids"][i : i + batch_size, :width].to(device), m[:, :width].to(device))  # [b, 2]
            preds.append(logits.argmax(-1).cpu())
    model.train()
    return _binary_metrics(torch.cat(preds), y)


def _subset(split_df, n, seed):
    """``n`` rows drawn with a fixed seed (all rows when ``n`` is None): the same emails for every run."""
    if n is None or n >= len(split_df):
        return split_df
    return split_df.sample(n=n, random_state=seed)


def _classifier(model, device):
    """The pretrained encoder (float32, on ``device``) with its attention-probability dropout off, and a fresh head."""
    from topk_lib.hf.loading import load_model

    encoder, tokenizer = load_model(model, device=device, dtype="float32")
    for module in encoder.modules():  # no attention dropout in any run: top-k attention has none
        if hasattr(module, "dropout") and "SelfAttention" in type(module).__name__:
            module.dropout.p = 0.0
    return SpamClassifier(encoder).to(device), tokenizer


def finetune_spam(*, split_df, attn_k=None, ff_k=None, seed: int = 0, steps: int = 100, batch_size: int = 16,
                  lr: float = 1e-4, weight_decay: float = 0.01, warmup: float = 0.1, max_length: int = 128,
                  eval_every: int = 50, n_val: int | None = 200, n_test: int | None = None, chunk_size: int = 1024,
                  swap_attn_ks=(), swap_ff_ks=(), model: str = BASE_MODEL, device=None, dtype=None,
                  progress: bool = True) -> dict:
    """Fine-tune MiniLM + head on the ``split_df`` of :func:`spam_split` under ``use_topk(attn_k, ff_k)``.

    Training draws ``steps`` batches from the train split (seeded order, identical for every
    k). Every ``eval_every`` steps the curve records the mean training loss and the
    validation accuracy on ``n_val`` emails (no validation when 0). The final model's test
    accuracy and F1 (spam = positive) on ``n_test`` test emails (all when None) are measured
    under the training setting. ``swap_attn_ks`` / ``swap_ff_ks``: extra test evaluations of
    the same model under attention / feed-forward top-k (the swap without training).
    ``model`` is anything :func:`topk_lib.hf.loading.load_model` takes (tests use a tiny BERT).
    ``device``/``dtype``: see :func:`~topk_lib.experiments.training.loop.training_precision`
    (default: the CPU in float32).
    """
    from topk_lib.hf.patching import use_topk

    optional_k(attn_k, "attn_k")
    optional_k(ff_k, "ff_k")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("max_length", max_length),
                        ("eval_every", eval_every)):
        positive_int(value, name)
    if "split" not in split_df.columns or "input" not in split_df.columns:
        raise ValueError("split_df must come from spam_split() (columns 'input', 'split', 'y')")
    torch.manual_seed(seed)
    device, dtype, _ = training_precision(device, dtype)
    clf, tokenizer = _classifier(model, device)

    def tokens(df):
        enc = tokenizer(list(df.input), padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, torch.tensor(df.y.to_numpy())

    train = split_df[split_df.split == "train"]
    train_y = torch.tensor(train.y.to_numpy())
    val_enc, val_y = tokens(_subset(split_df[split_df.split == "val"], n_val, 0)) if n_val != 0 else (None, None)
    test_enc, test_y = tokens(_subset(split_df[split_df.split == "test"], n_test, 0))
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n_warm = int(warmup * steps)
    curve, losses = [], []
    clf.train()
    start = time.perf_counter()
    bar = progress_bar(steps, f"MiniLM attn_k={k_label(attn_k)} ff_k={k_label(ff_k)} seed={seed}", progress)
    with use_topk(clf.encoder, attn_k=attn_k, ff_k=ff_k, chunk_size=chunk_size):
        for step, idx in enumerate(batches(len(train_y), batch_size, steps, gen)):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps=steps, warmup=n_warm, lr=lr)
            enc, _ = tokens(train.iloc[idx.tolist()])  # only the emails this step needs
            m = enc["attention_mask"]  # [b, max_length]
            width = int(m.sum(1).max())
            with autocast(device, dtype):
                logits = clf(enc["input_ids"][:, :width].to(device), m[:, :width].to(device))  # [b, 2]
            loss = F.cross_entropy(logits.float(), train_y[idx].to(device))
            losses.append(optimizer_step(clf, opt, loss))
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                point = {"step": step + 1, "train_loss": sum(losses) / len(losses)}
                if val_enc is not None:
                    # None/None names no layer, so the training context's k stays in force
                    point["val_acc"] = _evaluate(clf, val_enc, val_y, attn_k=None, ff_k=None, chunk_size=chunk_size,
                                                 device=device, dtype=dtype)["acc"]
                curve.append(point)
                losses = []
                bar.set_postfix(loss=f"{point['train_loss']:.3f}")
            bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    test = _evaluate(clf, test_enc, test_y, attn_k=attn_k, ff_k=ff_k, chunk_size=chunk_size, device=device, dtype=dtype)
    swaps = [(k, ff_k) for k in swap_attn_ks] + [(attn_k, k) for k in swap_ff_ks]
    swap = [{"attn_k": a, "ff_k": f, **_evaluate(clf, test_enc, test_y, attn_k=a, ff_k=f, chunk_size=chunk_size,
                                                 device=device, dtype=dtype)} for a, f in swaps]
    return {"attn_k": attn_k, "ff_k": ff_k, "seed": seed, "curve": curve, "test_acc": test["acc"],
            "test_f1": test["f1"], "n_test": len(test_y), "swap": swap, "train_seconds": seconds,
            "seconds_per_step": seconds / steps}


def finetune_sweep(*, settings, seeds, split_df, train_kw: dict | None = None, swap_attn_ks=(), swap_ff_ks=(),
                   device=None, dtype=None, root=None, progress: bool = True):
    """Every (setting, seed) fine-tuning run, cached; returns ``(curves, results)`` DataFrames.

    ``settings``: ``(attn_k, ff_k)`` pairs, ``None`` = exact/dense. The all-exact setting
    ``(None, None)`` also evaluates the swaps. ``results`` has one row per evaluation:
    ``mode`` ("trained" with top-k, or "swap": vanilla-trained, top-k at test only),
    ``attn_k``, ``ff_k`` (strings, "full" = exact), ``seed``, ``acc``, ``f1``. Each record
    stores the ``model_fingerprint`` of the pretrained encoder the runs start from, so a record
    fine-tuned from other weights is not reused. ``device``/``dtype``: where and in what precision
    the runs train (see :func:`finetune_spam`); runs off the CPU or in half precision are cached apart.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from topk_lib.hf.loading import load_model

    train_kw = dict(train_kw or {})
    device, dtype, precision = training_precision(device, dtype)
    # the default model is left out of the key: records written before the model could be chosen stay valid
    keyed_kw = {k: v for k, v in train_kw.items() if not (k == "model" and v == BASE_MODEL)}
    # Runs start from these weights: a record fine-tuned from other ones (another dtype, a
    # changed copy under the same name) is not reused.
    base, _ = load_model(train_kw.get("model", BASE_MODEL))
    mark = {"model_fingerprint": model_fingerprint(base)}
    del base
    # the cache key names the split by content: which emails, in which split
    split_key = config_key(sorted(zip(split_df.input, split_df.split)), length=12)
    rows, curve_rows = [], []
    runs = [(a, f, s) for a, f in settings for s in seeds]
    for attn_k, ff_k, seed in tqdm(runs, desc="fine-tuning runs", unit="run", disable=not progress):
        vanilla = attn_k is None and ff_k is None
        swaps = {"swap_attn_ks": list(swap_attn_ks), "swap_ff_ks": list(swap_ff_ks)} if vanilla else {}
        config = {"split": split_key, "train": keyed_kw, "attn_k": attn_k, "ff_k": ff_k, "seed": seed, **swaps,
                  **precision}

        def compute(attn_k=attn_k, ff_k=ff_k, seed=seed, swaps=swaps):
            return finetune_spam(split_df=split_df, attn_k=attn_k, ff_k=ff_k, seed=seed, device=device, dtype=dtype,
                                 progress=progress, **swaps, **train_kw)

        name = f"attn{k_label(attn_k)}_ff{k_label(ff_k)}_seed{seed}"
        rec = run_record("finetune", name, config=config, compute=compute, root=root, mark=mark,
                         required=("train_seconds", "test_acc", "test_f1", "swap", "curve"))
        base = {"seed": seed, "train_seconds": rec["train_seconds"]}
        rows.append({"mode": "trained", "attn_k": k_label(attn_k), "ff_k": k_label(ff_k), "acc": rec["test_acc"],
                     "f1": rec["test_f1"], **base})
        rows += [{"mode": "swap", "attn_k": k_label(s["attn_k"]), "ff_k": k_label(s["ff_k"]), "acc": s["acc"],
                  "f1": s["f1"], **base} for s in rec["swap"]]
        curve_rows += [{"attn_k": k_label(attn_k), "ff_k": k_label(ff_k), "seed": seed, **p} for p in rec["curve"]]
    return pd.DataFrame(curve_rows), pd.DataFrame(rows)
