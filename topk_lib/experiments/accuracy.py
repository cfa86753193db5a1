"""Accuracy versus k: the zero-shot task sweeps under ``use_topk``, each result cached, with bootstrap CIs.

Gupta et al. (2021, section 4) show that top-k attention and top-k feed-forward layers keep
the accuracy of pretrained models nearly unchanged down to small k, without corrective
training. This module runs that measurement for the tasks of :mod:`topk_lib.tasks`
(language modelling, classification, QA, passkey, retrieval): each sweep takes a list of
:class:`~topk_lib.experiments.settings.Setting`, caches every (task, setting) result
through :func:`~topk_lib.experiments.sweep.run_sweep`, and returns a tidy DataFrame, one
row per (setting, metric), with a 95 % percentile bootstrap interval over examples, or
over blocks of consecutive tokens for language modelling. It also builds the inputs the
sweeps score (texts, fortunes, polarity sentences, trivia and paragraph samples) from
:mod:`topk_lib.data`.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from topk_lib.data import fortunes_by_language, moby_dick_text, polarity_sentences, pydoc_text, sotu_speeches, trivia_qa
from topk_lib.experiments.settings import Setting, settings_grid
from topk_lib.experiments.sweep import (block_sums, bootstrap_ci, check_name, fingerprint, mean_row, metric_row,
                                        run_sweep, tidy_frame)
from topk_lib.hf.patching import use_topk
from topk_lib.tasks import classification, passkey, qa, retrieval
from topk_lib.tasks.lm import token_windows
from topk_lib.tasks.scoring import token_scores

__all__ = [
    "lm_sweep",
    "lm_sweeps",
    "classification_sweep",
    "classification_sweeps",
    "qa_sweep",
    "passkey_sweep",
    "retrieval_sweep",
    "corpus_text",
    "language_id_examples",
    "polarity_examples",
    "trivia_sample",
    "sotu_paragraphs",
    "CLASSIFICATION_TASKS",
]

#: Classification task -> (prompt template, label -> label word).
CLASSIFICATION_TASKS = {
    "language_id": (classification.LANGUAGE_TEMPLATE, classification.LANGUAGE_LABELS),
    "polarity": (classification.POLARITY_TEMPLATE, classification.POLARITY_LABELS),
}


def lm_sweep(model, tokenizer, text, *, model_name, corpus, settings, window=1024, n_windows=4, block=64,
             chunk_size=1024, progress=True, root=None):
    """Perplexity and next-token accuracy on ``n_windows`` windows of ``window`` tokens of ``text``.

    Windows come from :func:`topk_lib.tasks.lm.token_windows` (evenly spread, disjoint). The
    task is ``lm_{corpus}_{window}``; intervals resample blocks of ``block`` tokens.
    Metrics: ``perplexity``, ``accuracy`` (top-1 next token).
    """
    corpus = check_name(corpus, "corpus")
    windows = token_windows(tokenizer, text, window=window, n_windows=n_windows)  # [n, W]
    task = f"lm_{corpus}_{window}"
    config = {"model": model_name, "data": fingerprint(windows.tolist()), "window": window, "n_windows": n_windows,
              "chunk_size": chunk_size}

    def compute(setting):
        with use_topk(model, **setting.topk(), chunk_size=chunk_size):
            nll, ok = token_scores(model, windows, progress=progress)
        return {"nll": np.round(nll, 5).tolist(), "correct": ok.astype(int).tolist()}

    records = run_sweep(task, settings, config=config, compute=compute, progress=progress, root=root, model=model,
                        required=("nll", "correct"))

    def rows_of(rec):
        nll_s, counts = block_sums(rec["nll"], block=block)
        ok_s, _ = block_sums(rec["correct"], block=block)
        return [metric_row("perplexity", *bootstrap_ci(nll_s, weights=counts, transform=np.exp), counts.sum()),
                metric_row("accuracy", *bootstrap_ci(ok_s, weights=counts), counts.sum())]

    return tidy_frame(task, settings, records, rows_of)


def classification_sweep(model, tokenizer, examples, *, model_name, task, template, labels, settings,
                         content_free=classification.CONTENT_FREE, batch_size=16, chunk_size=1024, progress=True, root=None):
    """Zero-shot classification of ``[(text, label)]`` by label words, with contextual calibration.

    Content-free scores are recomputed under every setting (the model changes with k).
    Metrics: ``accuracy`` (calibrated), ``accuracy_raw`` (uncalibrated).
    """
    task = check_name(task, "task")
    examples = [(str(t), str(l)) for t, l in examples]
    config = {"model": model_name, "data": fingerprint(examples), "template": template, "labels": labels,
              "content_free": list(content_free), "chunk_size": chunk_size}

    def compute(setting):
        with use_topk(model, **setting.topk(), chunk_size=chunk_size):
            out = classification.classify(model, tokenizer, examples, template=template, labels=labels,
                                    content_free=content_free, batch_size=batch_size, progress=progress)
        return out

    records = run_sweep(task, settings, config=config, compute=compute, progress=progress, root=root, model=model,
                        required=("label", "calibrated", "raw"))

    def rows_of(rec):
        gold = np.array(rec["label"])
        return [mean_row("accuracy", (np.array(rec["calibrated"]) == gold).astype(float)),
                mean_row("accuracy_raw", (np.array(rec["raw"]) == gold).astype(float))]

    return tidy_frame(task, settings, records, rows_of)


def qa_sweep(model, tokenizer, pairs, *, model_name, settings, task="trivia", system=qa.QA_SYSTEM,
             max_new_tokens=24, batch_size=16, chunk_size=1024, progress=True, root=None):
    """Greedy answers to ``[(question, answer)]`` under decode-time top-k (KV cache).

    Metrics: ``contains`` (normalised gold answer inside the generated text), ``exact``
    (normalised exact match of the first line).
    """
    task = check_name(task, "task")
    pairs = [(str(q), str(a)) for q, a in pairs]
    prompts = qa.qa_prompts(tokenizer, [q for q, _ in pairs], system=system)
    config = {"model": model_name, "data": fingerprint([prompts, [a for _, a in pairs]]),
              "max_new_tokens": max_new_tokens, "chunk_size": chunk_size}

    def compute(setting):
        with use_topk(model, **setting.topk(), chunk_size=chunk_size):
            answers = qa.generate_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                batch_size=batch_size, progress=progress)
        scores = [qa.answer_scores(p, a) for p, (_, a) in zip(answers, pairs)]
        return {"answers": answers, "exact": [int(e) for e, _ in scores], "contains": [int(c) for _, c in scores]}

    records = run_sweep(task, settings, config=config, compute=compute, progress=progress, root=root, model=model,
                        required=("contains", "exact"))

    def rows_of(rec):
        return [mean_row("contains", rec["contains"]), mean_row("exact", rec["exact"])]

    return tidy_frame(task, settings, records, rows_of)


def passkey_sweep(model, tokenizer, *, model_name, settings, lengths, depths, n_per_cell=1, seed=0,
                  chunk_size=1024, progress=True, root=None):
    """Passkey retrieval accuracy (greedy decoding returns the whole key), per length and pooled.

    Rows: task ``passkey_{length}`` for each length, and ``passkey`` over all prompts.
    Metrics: ``accuracy`` (whole key right) and ``digits`` (share of answer tokens right).
    """
    from tqdm.auto import tqdm

    examples = passkey.passkey_examples(tokenizer, lengths=lengths, depths=depths, n_per_cell=n_per_cell, seed=seed)
    task = "passkey"
    config = {"model": model_name, "data": fingerprint([e["input_ids"] for e in examples]), "chunk_size": chunk_size}

    def compute(setting):
        correct, digits = [], []
        with use_topk(model, **setting.topk(), chunk_size=chunk_size):
            for ex in tqdm(examples, desc="passkeys", disable=not progress, leave=False):
                pred = passkey.greedy_continuation(model, ex["input_ids"], answer_len=ex["answer_len"])
                answer = ex["input_ids"][-ex["answer_len"]:]
                correct.append(int(pred == answer))
                digits.append(float(np.mean([p == a for p, a in zip(pred, answer)])))
        return {"length": [e["length"] for e in examples], "depth": [e["depth"] for e in examples],
                "tokens": [e["n_tokens"] for e in examples], "correct": correct, "digits": digits}

    records = run_sweep(task, settings, config=config, compute=compute, progress=progress, root=root, model=model,
                        required=("length", "correct", "digits"))

    def rows_of(rec):
        lengths_ = np.array(rec["length"])
        correct, digits = np.array(rec["correct"], float), np.array(rec["digits"])
        rows = []
        for length in sorted(set(lengths_.tolist())):
            sel = lengths_ == length
            rows += [{**mean_row("accuracy", correct[sel]), "task": f"passkey_{length}"},
                     {**mean_row("digits", digits[sel]), "task": f"passkey_{length}"}]
        return rows + [mean_row("accuracy", correct), mean_row("digits", digits)]

    return tidy_frame(task, settings, records, rows_of)


def retrieval_sweep(model, tokenizer, pairs, *, model_name, settings, task="sotu_retrieval", max_length=256,
                    batch_size=32, chunk_size=1024, progress=True, root=None):
    """Paragraph retrieval with sentence embeddings (:func:`topk_lib.tasks.retrieval.embed`).

    Every query is ranked against all documents. Metrics: ``acc@1``, ``mrr`` and
    ``cosine`` (per pair, the mean of the query's and the document's cosine similarity to
    their vanilla embeddings; 1 for vanilla).
    """
    task = check_name(task, "task")
    pairs = [(str(q), str(d)) for q, d in pairs]
    queries, docs = [q for q, _ in pairs], [d for _, d in pairs]
    config = {"model": model_name, "data": fingerprint(pairs), "max_length": max_length, "chunk_size": chunk_size}
    reference = {}  # vanilla embeddings, computed once and only when a setting needs them

    def encode(texts, setting):
        with use_topk(model, **setting.topk(), chunk_size=chunk_size):
            return retrieval.embed(model, tokenizer, texts, max_length=max_length, batch_size=batch_size)  # [N, dim]

    def compute(setting):
        q, d = encode(queries, setting), encode(docs, setting)
        if setting.kind == "vanilla":
            reference.update(q=q, d=d)
        if not reference:
            vanilla = Setting("vanilla")
            reference.update(q=encode(queries, vanilla), d=encode(docs, vanilla))
        cos = (torch.nn.functional.cosine_similarity(q, reference["q"], dim=-1)
               + torch.nn.functional.cosine_similarity(d, reference["d"], dim=-1)) / 2  # [N]
        return {"rank": retrieval.retrieval_ranks(q, d).tolist(), "cosine": cos.double().tolist()}

    records = run_sweep(task, settings, config=config, compute=compute, progress=progress, root=root, model=model,
                        required=("rank", "cosine"))

    def rows_of(rec):
        rank = np.array(rec["rank"], dtype=float)
        return [mean_row("acc@1", (rank == 1).astype(float)), mean_row("mrr", 1 / rank),
                mean_row("cosine", rec["cosine"])]

    return tidy_frame(task, settings, records, rows_of)


# --------------------------------------------------------------------------- inputs and sweep families

#: Corpus name -> its text (``sotu``: all addresses joined by blank lines; ``pydoc``: offline).
CORPORA = {
    "moby-dick": lambda: moby_dick_text(fetch=True),
    "sotu": lambda: "\n\n".join(s["text"] for s in sotu_speeches(fetch=True)),
    "pydoc": pydoc_text,
}


def corpus_text(name):
    """The text of corpus ``name`` (one of :data:`CORPORA`), fetched when missing."""
    if name not in CORPORA:
        raise ValueError(f"corpus must be one of {sorted(CORPORA)}, got {name!r}")
    return CORPORA[name]()


def lm_sweeps(model, tokenizer, *, model_name, corpora, setups, budgets=None, progress=True, root=None):
    """:func:`lm_sweep` for every corpus and window length, concatenated.

    ``setups`` maps a window length to ``{"windows": n, "attn": [k], "ff": [k], "both": [[k, k]]}``.
    With ``budgets`` (nominal average k -> budget) each window length sweeps vanilla and the
    budgets instead of the uniform ks.
    """
    parts = []
    for corpus in corpora:
        text = corpus_text(corpus)
        for window, setup in setups.items():
            grid = (settings_grid(budgets=budgets) if budgets is not None else
                    settings_grid(attn_ks=setup["attn"], ff_ks=setup["ff"], both=setup["both"]))
            parts.append(lm_sweep(model, tokenizer, text, model_name=model_name, corpus=corpus, settings=grid,
                                  window=window, n_windows=setup["windows"], progress=progress, root=root))
    return pd.concat(parts, ignore_index=True)


def language_id_examples(*, per_label, chars, seed=0):
    """``[(fortune, language)]``: ``per_label`` one-line fortunes of ``chars = [min, max]`` characters per language."""
    fortunes = fortunes_by_language(min_chars=chars[0], max_chars=chars[1], fetch=True)
    fortunes = {lang: [" ".join(t.split()) for t in texts] for lang, texts in fortunes.items()}  # one line each
    return classification.balanced_sample(fortunes, n_per_label=per_label, seed=seed)


def polarity_examples(*, n, seed=0):
    """``[(sentence, "pos" | "neg")]``: ``n`` Pang & Lee sentences, half of each label."""
    sentences = polarity_sentences(fetch=True)
    return classification.balanced_sample(
        {label: [t for t, l in sentences if l == label] for label in ("pos", "neg")}, n_per_label=n // 2, seed=seed)


def classification_sweeps(model, tokenizer, examples, *, model_name, settings, progress=True, root=None):
    """:func:`classification_sweep` per task of ``examples`` (task -> examples), with the
    templates and label words of :data:`CLASSIFICATION_TASKS`, concatenated."""
    parts = []
    for task, task_examples in examples.items():
        template, labels = CLASSIFICATION_TASKS[task]
        parts.append(classification_sweep(model, tokenizer, task_examples, model_name=model_name, task=task,
                                          template=template, labels=labels, settings=settings, progress=progress,
                                          root=root))
    return pd.concat(parts, ignore_index=True)


def trivia_sample(*, n, seed=0):
    """``n`` trivia ``(question, answer)`` pairs drawn without replacement, in corpus order."""
    trivia = trivia_qa(fetch=True)
    return [trivia[i] for i in sorted(np.random.default_rng(seed).choice(len(trivia), n, replace=False))]


def sotu_paragraphs(*, n, sentences_per_paragraph, seed=0):
    """``n`` (query, document) pairs from the State of the Union (:func:`topk_lib.tasks.retrieval.paragraph_pairs`)."""
    return retrieval.paragraph_pairs([s["text"] for s in sotu_speeches(fetch=True)], n=n,
                                     sentences_per_paragraph=sentences_per_paragraph, seed=seed)
