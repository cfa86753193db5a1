"""Greedy continuations of a prompt with exact attention and with decode-time top-k attention.

:func:`compare_continuations` generates both (``use_topk`` around ``model.generate``; the
prompt's prefill runs top-k too) and finds the first generated token where they differ.
Generation is the slow part of notebook 06's second panel (~0.4 s a token for SmolLM2 on a
shared 2-core CPU), so it reports progress token by token and, given a
:class:`ContinuationCache`, generates each (prompt, length, attention) once: the exact
continuation does not depend on k, and a greedy continuation of n tokens starts with the
one of m < n tokens (the same steps), so a shorter request is a prefix of a cached one.
"""

from __future__ import annotations

import collections
import html
from dataclasses import dataclass

import torch

from topk_lib._validate import non_empty_text, positive_int
from topk_lib.hf.patching import use_topk

__all__ = [
    "Continuations",
    "ContinuationCache",
    "compare_continuations",
    "greedy_continuation",
    "first_divergence",
    "continuations_html",
    "continuations_text",
]


def first_divergence(a, b) -> int | None:
    """Index of the first position where token lists ``a`` and ``b`` differ; None if equal.

    When one is a prefix of the other (one stopped early at EOS), that is the shorter length.
    """
    a, b = list(a), list(b)
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class Continuations:
    """Greedy continuations of one prompt, exact and top-k, as generated token ids."""

    k: int
    prompt_tokens: int
    vanilla: list
    topk: list
    diverge: int | None  # index into the generated tokens; None = identical


class ContinuationCache:
    """Generated token ids per (prompt, chat, attention k or None), least recently used dropped.

    ``entries``: how many continuations to keep (token lists: a few kB each). One cache
    belongs to one model: keep one per model.
    """

    def __init__(self, entries: int = 256):
        self.entries = positive_int(entries, "entries")
        self._store: collections.OrderedDict = collections.OrderedDict()  # (prompt, chat, k) -> (asked, ids)
        self.generated = 0  # generate() calls made through this cache

    def get(self, prompt, chat, k, max_new_tokens):
        """The first ``max_new_tokens`` ids of a cached continuation at least that long, else None."""
        key = (prompt, chat, k)
        if key not in self._store:
            return None
        asked, ids = self._store[key]
        if asked < max_new_tokens and len(ids) == asked:  # shorter, and not stopped at EOS
            return None
        self._store.move_to_end(key)
        return ids[:max_new_tokens]

    def put(self, prompt, chat, k, max_new_tokens, ids):
        key = (prompt, chat, k)
        if key in self._store and self._store[key][0] >= max_new_tokens:
            return
        self._store[key] = (max_new_tokens, list(ids))
        self._store.move_to_end(key)
        while len(self._store) > self.entries:
            self._store.popitem(last=False)


class _Progress:
    """A ``generate`` streamer that reports tokens done: the first ``put`` is the prompt."""

    def __init__(self, report, total):
        self.report, self.total, self.done, self._prompt = report, total, 0, True

    def put(self, value):
        if self._prompt:
            self._prompt = False
            return
        self.done += 1
        self.report(self.done, self.total)

    def end(self):
        pass


def _prompt_ids(model, tokenizer, prompt, chat):
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]  # [1, P]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids  # [1, P]
    return ids.to(next(model.parameters()).device)


@torch.no_grad()
def greedy_continuation(model, tokenizer, prompt, *, k: int | None = None, max_new_tokens: int = 32,
                        chat: bool = False, progress=None) -> list:
    """Greedy continuation of ``prompt``: generated token ids, exact attention or top-``k``.

    ``progress(done, total)`` is called after each generated token.
    """
    ids = _prompt_ids(model, tokenizer, prompt, chat)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Greedy, and the sampling defaults of the model's generation config switched off explicitly.
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                  temperature=None, top_p=None, top_k=None, pad_token_id=pad)
    if progress is not None:
        kwargs["streamer"] = _Progress(progress, max_new_tokens)
    if k is None:
        return model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()
    with use_topk(model, attn_k=k):
        return model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()


def compare_continuations(model, tokenizer, prompt, *, k: int, max_new_tokens: int = 32, chat: bool = False,
                          cache: ContinuationCache | None = None, progress=None) -> Continuations:
    """Greedy continuation of ``prompt`` with exact attention and with top-``k`` attention.

    Top-k applies to every attention call inside ``generate`` (the prompt's prefill and each
    decoding step, which attends the KV cache). ``chat=True`` wraps the prompt in the
    tokenizer's chat template (instruct models), otherwise the raw text is continued.
    ``cache``: reuse continuations generated before (one cache per model).
    ``progress(what, done, total)``: called per generated token, ``what`` is ``"exact"`` or ``"top-k"``.
    """
    k = positive_int(k, "k")
    max_new_tokens = positive_int(max_new_tokens, "max_new_tokens")
    non_empty_text(prompt, "prompt")
    if not (hasattr(model, "generate") and model.can_generate()):
        raise ValueError(f"model: {type(model).__name__} cannot generate; use a decoder (e.g. smollm2-135m)")
    runs = {}
    for attn_k, what in ((None, "exact"), (k, f"top-{k}")):
        ids = None if cache is None else cache.get(prompt, chat, attn_k, max_new_tokens)
        if ids is None:
            report = None if progress is None else (lambda done, total, what=what: progress(what, done, total))
            ids = greedy_continuation(model, tokenizer, prompt, k=attn_k, max_new_tokens=max_new_tokens, chat=chat,
                                      progress=report)
            if cache is not None:
                cache.generated += 1
                cache.put(prompt, chat, attn_k, max_new_tokens, ids)
        runs[what] = ids
    vanilla, approx = runs["exact"], runs[f"top-{k}"]
    return Continuations(k=k, prompt_tokens=_prompt_ids(model, tokenizer, prompt, chat).shape[1], vanilla=vanilla,
                         topk=approx, diverge=first_divergence(vanilla, approx))


def continuations_html(result: Continuations, tokenizer, *, prompt: str | None = None) -> str:
    """The two continuations side by side as HTML, tokens from the divergence on highlighted."""
    def tokens(ids, color):
        cut = len(ids) if result.diverge is None else result.diverge
        same = html.escape(tokenizer.decode(ids[:cut]))
        rest = html.escape(tokenizer.decode(ids[cut:]))
        mark = f'<span style="background:{color};border-left:3px solid #c00">{rest}</span>' if rest else ""
        return f'<span style="white-space:pre-wrap">{same}{mark}</span>'

    where = ("identical" if result.diverge is None
             else f"first differ at generated token {result.diverge} (0-based), highlighted")
    head = f"<p><b>prompt</b> ({result.prompt_tokens} tokens): <i>{html.escape(prompt)}</i></p>" if prompt else ""
    return (f"{head}<p>greedy continuations, {len(result.vanilla)} / {len(result.topk)} new tokens: {where}</p>"
            '<table style="text-align:left"><tr><th>exact</th><td style="text-align:left">'
            f"{tokens(result.vanilla, '#ffe9a8')}</td></tr>"
            f'<tr><th>top-{result.k}</th><td style="text-align:left">{tokens(result.topk, "#ffc9c9")}</td></tr></table>')


def continuations_text(result: Continuations, tokenizer) -> str:
    """Plain-text version of :func:`continuations_html` (for logs and headless runs)."""
    def line(ids):
        cut = len(ids) if result.diverge is None else result.diverge
        return tokenizer.decode(ids[:cut]) + ("⟦" + tokenizer.decode(ids[cut:]) + "⟧" if cut < len(ids) else "")

    where = "identical" if result.diverge is None else f"diverge at generated token {result.diverge} (⟦ ⟧ after it)"
    return f"{where}\nexact : {line(result.vanilla)!r}\ntop-{result.k}: {line(result.topk)!r}"
