"""Passkey retrieval: a 5-digit key hidden in repeated filler text (Mohtashami & Jaggi 2023).

Scoring is teacher-forced: greedy decoding returns the key exactly when the argmax at
every answer position is the key's next token, so one forward pass replaces a generate
loop and gives the same verdict.
"""

from __future__ import annotations

import numbers
import random

import torch

from topk_lib._validate import positive_int
from topk_lib.tasks.scoring import bos_prefix, causal_parts, encode, model_device, output_logits

__all__ = [
    "PASSKEY_INTRO",
    "PASSKEY_FILLER",
    "PASSKEY_NEEDLE",
    "PASSKEY_QUESTION",
    "passkey_example",
    "passkey_examples",
    "greedy_continuation",
]

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_example(tokenizer, *, n_tokens, depth, passkey):
    """One passkey prompt of at most ``n_tokens`` tokens, the key at relative ``depth``.

    Layout: intro, filler sentences, the needle (after ``round(depth * n_filler)`` filler
    repeats), the rest of the filler, the question, then the answer ``" " + passkey`` (the
    answer's tokens are part of ``input_ids`` for teacher-forced scoring). Returns
    ``{"input_ids", "answer_len", "passkey", "depth", "n_tokens", "needle_start"}``;
    ``n_tokens`` is the actual length, within one filler repeat of the requested one.
    """
    n_tokens = positive_int(n_tokens, "n_tokens")
    if isinstance(depth, bool) or not isinstance(depth, numbers.Real):
        raise TypeError(f"depth must be a number in [0, 1] (0 = start, 1 = end), got {depth!r}")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be a number in [0, 1] (0 = start, 1 = end), got {depth!r}")
    passkey = str(passkey)
    if not passkey.isdigit():
        raise ValueError(f"passkey must be a string of digits, got {passkey!r}")
    head = bos_prefix(tokenizer) + encode(tokenizer, PASSKEY_INTRO)
    filler = encode(tokenizer, PASSKEY_FILLER)
    needle = encode(tokenizer, PASSKEY_NEEDLE.format(key=passkey))
    question = encode(tokenizer, PASSKEY_QUESTION)
    answer = encode(tokenizer, " " + passkey)
    fixed = len(head) + len(needle) + len(question) + len(answer)
    n_fill = (n_tokens - fixed) // len(filler)
    if n_fill < 1:
        raise ValueError(f"n_tokens={n_tokens} is too short: the prompt without filler already has {fixed} tokens")
    before = round(depth * n_fill)
    ids = head + filler * before + needle + filler * (n_fill - before) + question + answer
    return {
        "input_ids": ids,
        "answer_len": len(answer),
        "passkey": passkey,
        "depth": float(depth),
        "n_tokens": len(ids),
        "needle_start": len(head) + before * len(filler),
    }


def passkey_examples(tokenizer, *, lengths, depths, n_per_cell=1, seed=0):
    """Passkey prompts for every (length, depth, repeat); keys are 5-digit, fixed by ``seed``.

    Each cell's keys come from ``random.Random(f"{seed}:{length}:{depth}:{i}")``, so changing
    the grid never changes another cell's key.
    """
    n_per_cell = positive_int(n_per_cell, "n_per_cell")
    if not lengths or not depths:
        raise ValueError("lengths and depths must each name at least one value")
    out = []
    for length in lengths:
        for depth in depths:
            for i in range(n_per_cell):
                key = str(random.Random(f"{seed}:{length}:{depth}:{i}").randint(10000, 99999))
                out.append({**passkey_example(tokenizer, n_tokens=length, depth=depth, passkey=key),
                            "length": int(length)})
    return out


@torch.no_grad()
def greedy_continuation(model, input_ids, *, answer_len):
    """The tokens greedy decoding would produce for the last ``answer_len`` positions, teacher-forced.

    ``input_ids`` is a prompt followed by ``answer_len`` answer tokens. Returns the argmax
    token at each answer position given the true tokens before it; it equals the answer
    exactly when greedy generation after the prompt reproduces the answer.
    """
    answer_len = positive_int(answer_len, "answer_len")
    ids = torch.as_tensor(list(input_ids), dtype=torch.long)  # [L]
    if ids.dim() != 1 or ids.numel() <= answer_len:
        raise ValueError(f"input_ids must be a 1-D prompt longer than answer_len={answer_len}")
    base, head, softcap = causal_parts(model)
    hidden = base(input_ids=ids[None].to(model_device(model))).last_hidden_state  # [1, L, D]
    logits = output_logits(head, softcap, hidden[0, -answer_len - 1 : -1])  # [answer_len, V]
    return logits.argmax(-1).cpu().tolist()

