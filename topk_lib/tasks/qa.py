"""Question answering by greedy generation, scored by SQuAD-normalised answers.

The prompt is the chat template with a system message asking for a short answer (plain
``Question: …\nAnswer:`` text without a template); the answer is generated greedily with
the KV cache, so inside :func:`topk_lib.hf.patching.use_topk` every decoded token attends
to its top-k cached keys. Scores: exact match of the normalised first line, and answer
containment (the normalised gold answer occurs, as whole words, in the normalised
generated text).
"""

from __future__ import annotations

import re
import string

import torch

from topk_lib._validate import positive_int
from topk_lib.tasks.scoring import bos_prefix, encode, model_device, pad_token_id, progress_bar

__all__ = ["QA_SYSTEM", "qa_prompts", "generate_answers", "normalize_answer", "answer_scores"]

#: System message of the trivia prompt (chat models); asks for short answers.
QA_SYSTEM = "Answer the question with a short phrase, no explanation."


def qa_prompts(tokenizer, questions, *, system=QA_SYSTEM):
    """One prompt string per question: the chat template with ``system`` when the tokenizer has one.

    Without a chat template: ``"{system}\\n\\nQuestion: {q}\\nAnswer:"``.
    """
    chat = getattr(tokenizer, "chat_template", None)
    out = []
    for q in questions:
        if chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
            out.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        else:
            out.append((f"{system}\n\n" if system else "") + f"Question: {q}\nAnswer:")
    return out


@torch.no_grad()
def generate_answers(model, tokenizer, prompts, *, max_new_tokens=24, batch_size=16, progress=False):
    """Greedy continuations of ``prompts`` (decoded, special tokens dropped), in input order.

    Batches of similar length are left-padded and run through ``model.generate`` with the KV
    cache, so decode-time top-k applies when called inside ``use_topk``. Prompts are
    tokenised without special tokens (chat templates already hold theirs) plus BOS when
    the tokenizer adds it. Generation stops at ``max_new_tokens`` or the EOS token.
    """
    prompts = list(prompts)
    max_new_tokens = positive_int(max_new_tokens, "max_new_tokens")
    batch_size = positive_int(batch_size, "batch_size")
    prefix = bos_prefix(tokenizer)
    ids = [prefix + encode(tokenizer, p) for p in prompts]
    pad = pad_token_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    device = model_device(model)
    out = [None] * len(prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress_bar(batches, desc="generate", enabled=progress):
        width = max(len(ids[i]) for i in batch)
        x = torch.full((len(batch), width), pad, dtype=torch.long)  # [B, L], left-padded
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, L]
        for row, i in enumerate(batch):
            x[row, width - len(ids[i]) :] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]) :] = 1
        kw = {"eos_token_id": eos} if eos is not None else {}
        gen = model.generate(
            input_ids=x.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
            **kw,
        )  # [B, L + new]
        for row, i in enumerate(batch):
            out[i] = tokenizer.decode(gen[row, width:], skip_special_tokens=True)
    return out


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation) | {"‘", "’", "“", "”", "–", "—"}


def normalize_answer(text):
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = "".join(c for c in str(text).lower() if c not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def answer_scores(prediction, gold):
    """``(exact, contains)`` booleans for one generated answer.

    ``exact``: the normalised first non-empty line of ``prediction`` equals the normalised
    gold answer. ``contains``: the normalised gold answer occurs in the normalised whole
    prediction as a run of whole words. An empty gold answer scores False on both.
    """
    g = normalize_answer(gold)
    if not g:
        return False, False
    lines = [ln for ln in str(prediction).splitlines() if ln.strip()]
    first = normalize_answer(lines[0]) if lines else ""
    return first == g, f" {g} " in f" {normalize_answer(prediction)} "

