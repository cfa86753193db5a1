"""Paragraph retrieval with sentence embeddings: query = a paragraph's first sentence, document = the rest.

Every query is ranked against all documents by the cosine similarity of mean-pooled
sentence embeddings (:func:`embed`, sentence-transformers' recipe for all-MiniLM-L6-v2);
the score is the rank of the right document.
"""

from __future__ import annotations

import random
import re

import numpy as np
import torch
import torch.nn.functional as F

from topk_lib._validate import positive_int

__all__ = ["split_sentences", "paragraph_pairs", "retrieval_ranks", "embed"]

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"”’)]*\s+(?=[\"“‘(]?[A-Z0-9])")


def split_sentences(text):
    """Sentences of ``text``: split after . ! ? (and closing quotes) before a capital or digit.

    A plain rule, not a trained splitter: abbreviations like "Mr. Smith" split too.
    """
    return [s.strip() for s in _SENTENCE_END.split(str(text)) if s.strip()]


def paragraph_pairs(texts, *, n, sentences_per_paragraph=5, min_query_words=8, max_query_words=60, seed=0):
    """``[(query, document)]`` from ``n`` pseudo-paragraphs sampled from ``texts``.

    Each text is split into sentences, then into consecutive runs of
    ``sentences_per_paragraph`` sentences (a paragraph; the State of the Union files carry
    no paragraph breaks). The query is a paragraph's first sentence, the document the rest.
    Paragraphs whose first sentence has fewer than ``min_query_words`` or more than
    ``max_query_words`` words are skipped. The sample is fixed by ``seed``.
    """
    n = positive_int(n, "n")
    size = positive_int(sentences_per_paragraph, "sentences_per_paragraph")
    if size < 2:
        raise ValueError("sentences_per_paragraph must be >= 2 (a query sentence and a document)")
    candidates = []
    for text in texts:
        sents = split_sentences(text)
        for s in range(0, len(sents) - size + 1, size):
            query, rest = sents[s], sents[s + 1 : s + size]
            if min_query_words <= len(query.split()) <= max_query_words:
                candidates.append((query, " ".join(rest)))
    if len(candidates) < n:
        raise ValueError(f"n={n} but only {len(candidates)} paragraphs qualify; lower n or the word limits")
    rng = random.Random(seed)
    return [candidates[i] for i in sorted(rng.sample(range(len(candidates)), n))]


def retrieval_ranks(query_emb, doc_emb):
    """1-based rank of document ``i`` for query ``i`` by cosine similarity, ``[N]`` int array.

    Ties count against the right document (its rank is the number of documents scoring at
    least as high), so degenerate embeddings that score everything equal rank last.
    """
    q = torch.as_tensor(query_emb, dtype=torch.float64)
    d = torch.as_tensor(doc_emb, dtype=torch.float64)
    if q.dim() != 2 or d.dim() != 2 or q.shape != d.shape:
        raise ValueError(f"query_emb and doc_emb must both be [N, dim] with the same N, got {tuple(q.shape)}, {tuple(d.shape)}")
    sim = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T  # [N, N]
    right = sim.diagonal()[:, None]  # [N, 1]
    return (sim >= right).sum(-1).numpy().astype(np.int64)



def embed(model, tokenizer, texts, *, max_length=256, batch_size=32):
    """Sentence embeddings ``[N, hidden]``: mean of the last hidden states over real tokens, L2-normalised.

    This is sentence-transformers' recipe for all-MiniLM-L6-v2 (``max_seq_length`` 256).
    Runs under ``torch.no_grad``; works inside :func:`topk_lib.hf.patching.use_topk`.
    """
    if isinstance(texts, str):
        texts = [texts]
    device = next(model.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(device)
            hidden = model(**enc).last_hidden_state  # [B, L, hidden]
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, L, 1]
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [B, hidden]
            out.append(torch.nn.functional.normalize(pooled, p=2, dim=-1))
    return torch.cat(out) if out else torch.empty(0, model.config.hidden_size)
