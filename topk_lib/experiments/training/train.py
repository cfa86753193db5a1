"""Training with top-k attention (Gupta et al. 2021, section 4.1 and 4.3).

The paper's claim: a model trained (or fine-tuned) with top-k attention reaches the
accuracy of a vanilla one, so the memory saving of section 3 costs no accuracy. Two
experiments, both resumable (every finished run is cached as a small JSON file under
``paths.results() / "training"`` and skipped when present):

* **ListOps from scratch** (:func:`train_listops`, :func:`listops_sweep`): a small
  pre-LN encoder (:class:`TopkEncoder`, learned positions, mean- or CLS-pooled linear
  classifier) whose every attention layer is :func:`topk_lib.kernels.attention.topk_attention`,
  so the memory-efficient backward of that kernel is what trains it. ``k=None`` is exact
  attention through the same kernel. Validation accuracy every ``eval_every`` steps
  gives learning curves; the final model's test accuracy is reported.
* **MiniLM fine-tuning on SpamAssassin** (:func:`finetune_spam`, :func:`finetune_sweep`):
  all-MiniLM-L6-v2 plus a linear head on mean-pooled token states, trained inside
  :func:`topk_lib.hf.patching.use_topk` (attention top-k and/or feed-forward top-k), then
  evaluated under the same setting. The vanilla runs also evaluate the *swap without
  training*: the vanilla fine-tuned model tested under each top-k setting.

Fairness: every run of a sweep shares seeds, data order, steps and learning-rate
schedule; only k differs. MiniLM's attention-probability dropout is switched off in
all runs, because the patched (top-k) attention has none and the vanilla runs should
not differ in that. Hidden-state dropout stays on everywhere.

The SpamAssassin split (:func:`spam_split`) is fixed by a hash of each email's content,
so it does not depend on row order, and exact duplicates (the corpus has some) always
land in the same split. Input text is ``subject + blank line + body``; all other headers
are dropped (see :func:`spam_text`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from topk_lib.data import listops
from topk_lib.kernels.attention import topk_attention
from topk_lib.infra import paths

__all__ = [
    "TopkEncoder",
    "cached_run",
    "train_listops",
    "listops_sweep",
    "spam_text",
    "spam_split",
    "SpamClassifier",
    "finetune_spam",
    "finetune_sweep",
    "mean_std_table",
    "swap_vs_trained",
    "k_order",
    "plot_learning_curves",
    "plot_accuracy_vs_k",
    "plot_finetune_vs_k",
]


def _check_k(k, name):
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k <= 0):
        raise ValueError(f"{name} must be a positive int or None (exact), got {k!r}")


def _check_pos_int(value, name):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# --------------------------------------------------------------------------- the encoder


class TopkSelfAttention(nn.Module):
    """Multi-head self-attention through :func:`topk_attention` (``topk=None``: exact)."""

    def __init__(self, d_model, n_heads, *, topk=None, chunk_size=1024):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.n_heads, self.topk, self.chunk_size = n_heads, topk, chunk_size
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x, mask):
        b, l, d = x.shape
        q, k, v = self.qkv(x).view(b, l, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, dh]
        keys = mask[:, None, None, :]  # [B, 1, 1, L] True = real token: padding is never attended
        o = topk_attention(q, k, v, topk=self.topk, chunk_size=self.chunk_size, attn_mask=keys)  # [B, H, L, dh]
        return self.out(o.transpose(1, 2).reshape(b, l, d))  # [B, L, D]


class Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + ff(ln(x))``."""

    def __init__(self, d_model, n_heads, d_ff, *, dropout=0.0, topk=None, chunk_size=1024):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = TopkSelfAttention(d_model, n_heads, topk=topk, chunk_size=chunk_size)
        self.ff = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask):
        x = x + self.drop(self.attn(self.ln1(x), mask))  # [B, L, D]
        return x + self.drop(self.ff(self.ln2(x)))  # [B, L, D]


class TopkEncoder(nn.Module):
    """A small encoder classifier whose attention keeps the ``topk`` largest scores per query.

    Token and learned position embeddings, ``n_layers`` pre-LN blocks, a final LayerNorm,
    then ``pool="mean"`` (mean over real tokens) or ``"cls"`` (the first token) and a
    linear classifier. ``forward(ids [B, L], mask [B, L] bool) -> logits [B, n_classes]``.
    Set :attr:`topk` to change k in every layer (e.g. to test a swap).
    """

    def __init__(self, *, vocab_size, n_classes, max_len, d_model=64, n_heads=4, n_layers=2, d_ff=None,
                 dropout=0.0, pool="mean", topk=None, chunk_size=1024):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("n_classes", n_classes), ("max_len", max_len),
                            ("d_model", d_model), ("n_heads", n_heads), ("n_layers", n_layers)):
            _check_pos_int(value, name)
        _check_k(topk, "topk")
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got {pool!r}")
        self.pool, self.max_len = pool, max_len
        self.tok = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_ff or 4 * d_model, dropout=dropout, topk=topk, chunk_size=chunk_size)
            for _ in range(n_layers)
        )
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, n_classes)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    @property
    def topk(self):
        return self.blocks[0].attn.topk

    @topk.setter
    def topk(self, k):
        _check_k(k, "topk")
        for block in self.blocks:
            block.attn.topk = k

    def forward(self, ids, mask):
        b, l = ids.shape
        if l > self.max_len:
            raise ValueError(f"ids: sequence length {l} exceeds max_len={self.max_len} of the position table")
        x = self.tok(ids) + self.pos(torch.arange(l, device=ids.device))  # [B, L, D]
        for block in self.blocks:
            x = block(x, mask)  # [B, L, D]
        x = self.ln(x)
        if self.pool == "cls":
            pooled = x[:, 0]  # [B, D]
        else:
            w = mask.unsqueeze(-1).to(x.dtype)  # [B, L, 1]
            pooled = (x * w).sum(1) / w.sum(1).clamp(min=1.0)  # [B, D]
        return self.head(pooled)  # [B, n_classes]


# --------------------------------------------------------------------------- caching


def _write_json(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)  # atomic: a crash leaves no half-written result
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tag(value):
    return "full" if value is None else str(value)


def cached_run(*, task: str, name: str, config: dict, compute, root=None) -> dict:
    """Return the cached record of one run, or ``compute()`` it and cache it.

    The file is ``root / task / f"{name}_{hash}.json"`` (``root`` defaults to
    ``paths.results() / "training"``); the hash covers ``config``, so a changed setting never
    reuses an old result. ``compute()`` returns a JSON-serialisable dict; ``task``, ``name``
    and ``config`` are added to it.
    """
    root = Path(root) if root is not None else paths.results() / "training"
    key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    path = root / task / f"{name}_{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    record = {"task": task, "name": name, "config": config, **compute()}
    _write_json(path, record)
    return record


def _lr_at(step, *, steps, warmup, lr):
    """Linear warm-up, then linear decay to zero."""
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * max(0.0, (steps - step) / max(1, steps - warmup))


def _batches(n, batch_size, steps, generator):
    """``steps`` index batches, reshuffling every epoch (deterministic in ``generator``)."""
    order = torch.randperm(n, generator=generator)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        yield order[pos : pos + batch_size]
        pos += batch_size


def _progress(total, desc, enabled):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=not enabled)


# --------------------------------------------------------------------------- ListOps


def _listops_accuracy(model, ids, mask, labels, *, batch_size=256):
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            m = mask[i : i + batch_size]
            width = int(m.sum(1).max())
            logits = model(ids[i : i + batch_size, :width], m[:, :width])  # [b, 10]
            correct += int((logits.argmax(-1) == labels[i : i + batch_size]).sum())
    model.train()
    return correct / max(1, len(ids))


def train_listops(*, splits: dict, k=None, seed: int = 0, steps: int = 300, batch_size: int = 32, lr: float = 1e-3,
                  weight_decay: float = 0.01, warmup: float = 0.1, eval_every: int = 50, n_eval: int | None = None,
                  model_kw: dict | None = None, chunk_size: int = 1024, progress: bool = True) -> dict:
    """Train a :class:`TopkEncoder` with attention top-``k`` on ListOps ``splits`` (see :func:`listops.listops_splits`).

    AdamW, linear warm-up for ``warmup`` of the steps then linear decay, gradient norm
    clipped at 1. Validation accuracy (on the first ``n_eval`` validation examples, all
    when None) every ``eval_every`` steps and at the end; test accuracy of the final model.
    Returns ``{"k", "seed", "curve": [{"step", "val_acc", "train_loss"}], "test_acc",
    "train_seconds", "seconds_per_step"}``.
    """
    _check_k(k, "k")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("eval_every", eval_every)):
        _check_pos_int(value, name)
    if not 0 <= warmup < 1:
        raise ValueError(f"warmup is a fraction of the steps in [0, 1), got {warmup}")
    missing = {"train", "val", "test"} - set(splits)
    if missing:
        raise ValueError(f"splits must have 'train', 'val' and 'test' DataFrames; missing {sorted(missing)}")
    torch.manual_seed(seed)
    data = {}
    for name, df in splits.items():
        df = df if name == "train" or n_eval is None else df.iloc[:n_eval]
        ids, mask = listops.encode(list(df.expr))  # [N, L], [N, L] with <cls> first
        data[name] = (ids, mask, torch.tensor(df.label.to_numpy(), dtype=torch.long))
    max_len = max(d[0].shape[1] for d in data.values())
    kw = {"d_model": 64, "n_heads": 4, "n_layers": 2, "pool": "mean", **(model_kw or {})}
    model = TopkEncoder(vocab_size=len(listops.VOCAB), n_classes=10, max_len=max_len, topk=k,
                        chunk_size=chunk_size, **kw)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)  # data order: identical for every k
    ids, mask, labels = data["train"]
    curve, losses = [], []
    n_warm = int(warmup * steps)
    model.train()
    start = time.perf_counter()
    bar = _progress(steps, f"ListOps k={_tag(k)} seed={seed}", progress)
    for step, idx in enumerate(_batches(len(ids), batch_size, steps, gen)):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps=steps, warmup=n_warm, lr=lr)
        m = mask[idx]  # [b, L]
        width = int(m.sum(1).max())  # trim padding shared by the whole batch
        logits = model(ids[idx, :width], m[:, :width])  # [b, 10]
        loss = F.cross_entropy(logits, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            val = _listops_accuracy(model, *data["val"])
            curve.append({"step": step + 1, "val_acc": val, "train_loss": sum(losses) / len(losses)})
            losses = []
            bar.set_postfix(val_acc=f"{val:.3f}")
        bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    return {"k": k, "seed": seed, "curve": curve, "test_acc": _listops_accuracy(model, *data["test"]),
            "train_seconds": seconds, "seconds_per_step": seconds / steps}


def listops_sweep(*, ks, seeds, data_kw: dict, train_kw: dict | None = None, root=None, progress: bool = True):
    """Every (k, seed) ListOps run, cached; returns ``(curves, results)`` DataFrames.

    ``data_kw`` goes to :func:`listops.listops_splits`, ``train_kw`` to :func:`train_listops`.
    ``results`` has one row per run (``k`` is "full" for exact attention, ``test_acc``,
    ``train_seconds``); ``curves`` one row per evaluation (``step``, ``val_acc``, ``train_loss``).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    train_kw = dict(train_kw or {})
    splits = None
    rows, curve_rows = [], []
    runs = [(k, s) for k in ks for s in seeds]
    for k, seed in tqdm(runs, desc="ListOps runs", unit="run", disable=not progress):
        config = {"data": data_kw, "train": train_kw, "k": k, "seed": seed}

        def compute(k=k, seed=seed):
            nonlocal splits
            if splits is None:  # only when something must be trained
                splits = listops.listops_splits(**data_kw, progress=progress)
            return train_listops(splits=splits, k=k, seed=seed, progress=progress, **train_kw)

        rec = cached_run(task="listops", name=f"k{_tag(k)}_seed{seed}", config=config, compute=compute, root=root)
        rows.append({"k": _tag(k), "seed": seed, "test_acc": rec["test_acc"], "train_seconds": rec["train_seconds"],
                     "seconds_per_step": rec["seconds_per_step"]})
        curve_rows += [{"k": _tag(k), "seed": seed, **point} for point in rec["curve"]]
    return pd.DataFrame(curve_rows), pd.DataFrame(rows)


# --------------------------------------------------------------------------- SpamAssassin


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
    u = [int.from_bytes(hashlib.sha256(x.encode("utf-8", "replace")).digest()[:8], "big") / 2.0**64 for x in out.input]
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


def _spam_eval(model, enc, y, *, attn_k, ff_k, chunk_size, batch_size=64):
    from topk_lib.hf.patching import use_topk

    model.eval()
    preds = []
    with torch.no_grad(), use_topk(model.encoder, attn_k=attn_k, ff_k=ff_k, chunk_size=chunk_size):
        for i in range(0, len(y), batch_size):
            m = enc["attention_mask"][i : i + batch_size]
            width = int(m.sum(1).max())
            logits = model(enc["input_ids"][i : i + batch_size, :width], m[:, :width])  # [b, 2]
            preds.append(logits.argmax(-1))
    model.train()
    return _binary_metrics(torch.cat(preds), y)


def _subset(split_df, n, seed):
    """``n`` rows drawn with a fixed seed (all rows when ``n`` is None): the same emails for every run."""
    if n is None or n >= len(split_df):
        return split_df
    return split_df.sample(n=n, random_state=seed)


def finetune_spam(*, split_df, attn_k=None, ff_k=None, seed: int = 0, steps: int = 100, batch_size: int = 16,
                  lr: float = 1e-4, weight_decay: float = 0.01, warmup: float = 0.1, max_length: int = 128,
                  eval_every: int = 50, n_val: int | None = 200, n_test: int | None = None, chunk_size: int = 1024,
                  swap_attn_ks=(), swap_ff_ks=(), model: str = "minilm-l6", progress: bool = True) -> dict:
    """Fine-tune MiniLM + head on the ``split_df`` of :func:`spam_split` under ``use_topk(attn_k, ff_k)``.

    Training draws ``steps`` batches from the train split (seeded order, identical for every
    k). Every ``eval_every`` steps the curve records the mean training loss and the
    validation accuracy on ``n_val`` emails (no validation when 0). The final model's test
    accuracy and F1 (spam = positive) on ``n_test`` test emails (all when None) are measured
    under the training setting. ``swap_attn_ks`` / ``swap_ff_ks``: extra test evaluations of
    the same model under attention / feed-forward top-k (the swap without training).
    ``model`` is anything :func:`topk_lib.hf.loading.load_model` takes (tests use a tiny BERT).
    """
    from topk_lib.hf.loading import load_model
    from topk_lib.hf.patching import use_topk

    _check_k(attn_k, "attn_k")
    _check_k(ff_k, "ff_k")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("max_length", max_length),
                        ("eval_every", eval_every)):
        _check_pos_int(value, name)
    if "split" not in split_df.columns or "input" not in split_df.columns:
        raise ValueError("split_df must come from spam_split() (columns 'input', 'split', 'y')")
    torch.manual_seed(seed)
    encoder, tokenizer = load_model(model)
    for module in encoder.modules():  # no attention dropout in any run: top-k attention has none
        if hasattr(module, "dropout") and "SelfAttention" in type(module).__name__:
            module.dropout.p = 0.0
    clf = SpamClassifier(encoder)

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
    bar = _progress(steps, f"MiniLM attn_k={_tag(attn_k)} ff_k={_tag(ff_k)} seed={seed}", progress)
    with use_topk(encoder, attn_k=attn_k, ff_k=ff_k, chunk_size=chunk_size):
        for step, idx in enumerate(_batches(len(train_y), batch_size, steps, gen)):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, steps=steps, warmup=n_warm, lr=lr)
            enc, _ = tokens(train.iloc[idx.tolist()])  # only the emails this step needs
            m = enc["attention_mask"]  # [b, max_length]
            width = int(m.sum(1).max())
            logits = clf(enc["input_ids"][:, :width], m[:, :width])  # [b, 2]
            loss = F.cross_entropy(logits, train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(clf.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if (step + 1) % eval_every == 0 or step + 1 == steps:
                point = {"step": step + 1, "train_loss": sum(losses) / len(losses)}
                if val_enc is not None:
                    # None/None names no layer, so the training context's k stays in force
                    point["val_acc"] = _spam_eval(clf, val_enc, val_y, attn_k=None, ff_k=None,
                                                  chunk_size=chunk_size)["acc"]
                curve.append(point)
                losses = []
                bar.set_postfix(loss=f"{point['train_loss']:.3f}")
            bar.update(1)
    bar.close()
    seconds = time.perf_counter() - start
    test = _spam_eval(clf, test_enc, test_y, attn_k=attn_k, ff_k=ff_k, chunk_size=chunk_size)
    swap = []
    for k in swap_attn_ks:
        swap.append({"attn_k": k, "ff_k": ff_k, **_spam_eval(clf, test_enc, test_y, attn_k=k, ff_k=ff_k,
                                                                chunk_size=chunk_size)})
    for k in swap_ff_ks:
        swap.append({"attn_k": attn_k, "ff_k": k, **_spam_eval(clf, test_enc, test_y, attn_k=attn_k, ff_k=k,
                                                                  chunk_size=chunk_size)})
    return {"attn_k": attn_k, "ff_k": ff_k, "seed": seed, "curve": curve, "test_acc": test["acc"],
            "test_f1": test["f1"], "n_test": len(test_y), "swap": swap, "train_seconds": seconds,
            "seconds_per_step": seconds / steps}


def finetune_sweep(*, settings, seeds, split_df, train_kw: dict | None = None, swap_attn_ks=(), swap_ff_ks=(),
                   root=None, progress: bool = True):
    """Every (setting, seed) fine-tuning run, cached; returns ``(curves, results)`` DataFrames.

    ``settings``: ``(attn_k, ff_k)`` pairs, ``None`` = exact/dense. The all-exact setting
    ``(None, None)`` also evaluates the swaps. ``results`` has one row per evaluation:
    ``mode`` ("trained" with top-k, or "swap": vanilla-trained, top-k at test only),
    ``attn_k``, ``ff_k`` (strings, "full" = exact), ``seed``, ``acc``, ``f1``.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    train_kw = dict(train_kw or {})
    # the cache key names the split by content: which emails, in which split
    split_key = hashlib.sha256(json.dumps(sorted(zip(split_df.input, split_df.split))).encode()).hexdigest()[:12]
    rows, curve_rows = [], []
    runs = [(a, f, s) for a, f in settings for s in seeds]
    for attn_k, ff_k, seed in tqdm(runs, desc="fine-tuning runs", unit="run", disable=not progress):
        vanilla = attn_k is None and ff_k is None
        swaps = {"swap_attn_ks": list(swap_attn_ks), "swap_ff_ks": list(swap_ff_ks)} if vanilla else {}
        config = {"split": split_key, "train": train_kw, "attn_k": attn_k, "ff_k": ff_k, "seed": seed, **swaps}

        def compute(attn_k=attn_k, ff_k=ff_k, seed=seed, swaps=swaps):
            return finetune_spam(split_df=split_df, attn_k=attn_k, ff_k=ff_k, seed=seed, progress=progress,
                                 **swaps, **train_kw)

        name = f"attn{_tag(attn_k)}_ff{_tag(ff_k)}_seed{seed}"
        rec = cached_run(task="finetune", name=name, config=config, compute=compute, root=root)
        base = {"seed": seed, "train_seconds": rec["train_seconds"]}
        rows.append({"mode": "trained", "attn_k": _tag(attn_k), "ff_k": _tag(ff_k), "acc": rec["test_acc"],
                     "f1": rec["test_f1"], **base})
        rows += [{"mode": "swap", "attn_k": _tag(s["attn_k"]), "ff_k": _tag(s["ff_k"]), "acc": s["acc"],
                  "f1": s["f1"], **base} for s in rec["swap"]]
        curve_rows += [{"attn_k": _tag(attn_k), "ff_k": _tag(ff_k), "seed": seed, **p} for p in rec["curve"]]
    return pd.DataFrame(curve_rows), pd.DataFrame(rows)


# --------------------------------------------------------------------------- tables and figures


def k_order(values):
    """Sort k labels numerically with "full" last."""
    return sorted(set(values), key=lambda v: (v == "full", int(v) if v != "full" else 0))


def mean_std_table(df, *, by, value):
    """``mean``, ``std`` and ``n`` of ``value`` per group ``by``, plus a ``mean ± std`` text column."""
    g = df.groupby(by, sort=False)[value].agg(["mean", "std", "count"]).rename(columns={"count": "n"})
    g["std"] = g["std"].fillna(0.0)
    g["mean ± std"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(g["mean"], g["std"])]
    return g



def swap_vs_trained(results, *, attn_ks=(), ff_ks=()):
    """Per top-k setting: the swap (vanilla fine-tuned, top-k at test) and fine-tuning with top-k, vs vanilla.

    ``results`` is :func:`finetune_sweep`'s frame. Columns: ``vanilla``, ``swap``, ``swap_std``,
    ``trained``, ``trained_std`` (test accuracy, mean and std over seeds; NaN where not run) and
    ``verdict``: whether trained minus swap is larger than the larger of the two seed stds.
    """
    import pandas as pd

    stats = results.groupby(["mode", "attn_k", "ff_k"]).acc.agg(["mean", "std"])
    vanilla = stats.loc[("trained", "full", "full"), "mean"]
    rows = []
    for kind, ks in (("attention", attn_ks), ("feed-forward", ff_ks)):
        for k in ks:
            key = (str(k), "full") if kind == "attention" else ("full", str(k))
            swap = stats.loc[("swap", *key)]
            row = {"setting": f"{kind} k={k}", "vanilla": vanilla, "swap": swap["mean"], "swap_std": swap["std"],
                   "trained": float("nan"), "trained_std": float("nan"), "verdict": "not fine-tuned with top-k"}
            if ("trained", *key) in stats.index:
                trained = stats.loc[("trained", *key)]
                gap, noise = trained["mean"] - swap["mean"], max(trained["std"], swap["std"])
                if pd.isna(noise):
                    verdict = "one seed, no spread to compare with"
                elif abs(gap) <= noise:
                    verdict = "within the seed spread"
                else:
                    verdict = "training with top-k helps" if gap > 0 else "training with top-k hurts"
                row.update(trained=trained["mean"], trained_std=trained["std"], verdict=verdict)
            rows.append(row)
    return pd.DataFrame(rows).set_index("setting")


def plot_learning_curves(curves, *, title: str, references=()):
    """Validation accuracy against step, one line per k (mean over seeds, band: ± 1 std).

    ``references``: ``(value, label)`` pairs drawn as grey horizontal lines.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    order = k_order(curves.k)
    palette = dict(zip(order, sns.color_palette("viridis", len(order) - 1) + [(0.1, 0.1, 0.1)]))
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    sns.lineplot(data=curves, x="step", y="val_acc", hue="k", hue_order=order, palette=palette, errorbar="sd",
                 marker="o", markersize=3, ax=ax)
    for (value, label), ls in zip(references, ("--", ":", "-.")):  # e.g. a paper's number, a baseline
        ax.axhline(value, color="grey", ls=ls, lw=1, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.legend(title="k (keys per query)", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def _k_axis(ax, order):
    ax.set_xticks(range(len(order)), order)
    ax.set_xlabel("k (keys kept per query; full = exact)")


def plot_accuracy_vs_k(results, *, title: str, y="test_acc", ylabel="test accuracy", references=()):
    """Mean test accuracy per k with ± 1 std error bars over seeds, and the single seeds as dots."""
    import matplotlib.pyplot as plt

    order = k_order(results.k)
    stats = results.groupby("k")[y].agg(["mean", "std"]).reindex(order).fillna(0.0)
    fig, ax = plt.subplots(figsize=(5.5, 4))
    x = range(len(order))
    ax.errorbar(x, stats["mean"], yerr=stats["std"], fmt="o-", capsize=4, color="C0", label="mean ± std over seeds")
    pos = {k: i for i, k in enumerate(order)}
    ax.scatter([pos[k] for k in results.k], results[y], s=12, color="C0", alpha=0.4, label="single seeds")
    for (value, label), ls in zip(references, ("--", ":", "-.")):  # e.g. a paper's number, a baseline
        ax.axhline(value, color="grey", ls=ls, lw=1, label=label)
    _k_axis(ax, order)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def plot_finetune_vs_k(results, *, title: str):
    """Accuracy and F1 against attention k (left) and feed-forward k (right), trained vs swapped.

    ``results`` as from :func:`finetune_sweep`; points are means over seeds, error bars ± 1 std.
    """
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    panels = [("attn_k", results[results.ff_k == "full"], "attention k"),
              ("ff_k", results[results.attn_k == "full"], "feed-forward k")]
    styles = {("trained", "acc"): ("o-", "C0"), ("swap", "acc"): ("s--", "C1"),
              ("trained", "f1"): ("o-", "C2"), ("swap", "f1"): ("s--", "C3")}
    labels = {"trained": "fine-tuned with top-k", "swap": "fine-tuned vanilla, top-k at test"}
    for ax, (col, df, name) in zip(axes, panels):
        order = k_order(df[col])
        pos = {k: i for i, k in enumerate(order)}
        for (mode, metric), (fmt, color) in styles.items():
            part = df[df["mode"] == mode]
            if mode == "swap":  # the swap curve ends at the vanilla model itself
                part = _concat(part, df[(df["mode"] == "trained") & (df[col] == "full")])
            if part.empty:
                continue
            stats = part.groupby(col)[metric].agg(["mean", "std"]).fillna(0.0)
            stats = stats.reindex([k for k in order if k in stats.index])
            offset = {"trained": -0.05, "swap": 0.05}[mode]
            ax.errorbar([pos[k] + offset for k in stats.index], stats["mean"], yerr=stats["std"], fmt=fmt,
                        color=color, capsize=3, label=f"{metric}: {labels[mode]}")
        _k_axis(ax, order)
        ax.set_xlabel(f"{name} (full = exact/dense)")
        ax.set_title(name)
    axes[0].set_ylabel("test score (mean ± std over seeds)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.legend(handles, names, fontsize="small", loc="lower center", ncols=2, frameon=False)
    return fig


def _concat(a, b):
    import pandas as pd

    return pd.concat([a, b], ignore_index=True)
