"""Zero-shot classification by label words, with contextual calibration (Zhao et al. 2021).

Each input is scored by the log-probability of each label word after a prompt; the label
with the highest score wins. "Calibrate before use" (Zhao et al. 2021) divides the label
distribution by the one the model gives content-free prompts ("N/A", "", "[MASK]"):
``q(y|x) ∝ p(y|x) / p_cf(y)`` where ``p`` is renormalised over the labels and ``p_cf`` is
its mean over the content-free inputs. Templates and label words for 7-language
identification (Debian fortune cookies) and movie-review polarity (Pang & Lee) are
constants here. Nothing here switches top-k on; callers wrap these functions in
:func:`topk_lib.hf.patching.use_topk`.
"""

from __future__ import annotations

import random

import numpy as np
import torch

from topk_lib._validate import positive_int
from topk_lib.tasks.scoring import (bos_prefix, causal_parts, encode, model_device, output_logits, pad_token_id,
                                    progress_bar, right_padded)

__all__ = [
    "balanced_sample",
    "label_logprobs",
    "contextual_calibration",
    "classify",
    "LANGUAGE_LABELS",
    "LANGUAGE_TEMPLATE",
    "POLARITY_LABELS",
    "POLARITY_TEMPLATE",
    "CONTENT_FREE",
]

#: Fortune-file language code -> label word (one SmolLM2 token each, with the leading space).
LANGUAGE_LABELS = {
    "en": " English",
    "de": " German",
    "it": " Italian",
    "es": " Spanish",
    "pl": " Polish",
    "cs": " Czech",
    "pt": " Portuguese",
}
#: Prompt for language identification; picked among three wordings on a small pilot sample.
LANGUAGE_TEMPLATE = "Text: {text}\nLanguage:"
#: Pang & Lee label -> label word.
POLARITY_LABELS = {"pos": " positive", "neg": " negative"}
#: Prompt for review polarity; picked among three wordings on a small pilot sample.
POLARITY_TEMPLATE = "Review: {text}\nSentiment:"
#: Content-free inputs of Zhao et al. (2021), section 5.
CONTENT_FREE = ("N/A", "", "[MASK]")


def balanced_sample(groups, *, n_per_label, seed=0):
    """``[(text, label)]``: ``n_per_label`` texts drawn without replacement from each group.

    ``groups`` maps a label to its texts. Deterministic in ``seed`` (a string seed per label,
    so adding a label does not change the others' draws); labels in the order given.
    """
    n_per_label = positive_int(n_per_label, "n_per_label")
    out = []
    for label, texts in groups.items():
        texts = list(texts)
        if len(texts) < n_per_label:
            raise ValueError(f"n_per_label={n_per_label} but label {label!r} has only {len(texts)} texts")
        rng = random.Random(f"{seed}:{label}")
        out += [(texts[i], label) for i in sorted(rng.sample(range(len(texts)), n_per_label))]
    return out


@torch.no_grad()
def label_logprobs(model, tokenizer, prompts, label_words, *, batch_size=16, progress=False):
    """``[N, C]`` numpy array: log p(label word | prompt), summed over the word's tokens.

    Prompts are tokenised without special tokens (plus BOS when the tokenizer adds it), the
    label words likewise and appended. When every label word is one token, one forward per
    prompt reads all of them from the last position's distribution; otherwise each
    (prompt, label) pair is its own sequence. Sequences are batched by length, right-padded.
    """
    prompts, label_words = list(prompts), list(label_words)
    if not label_words:
        raise ValueError("label_words must name at least one label word")
    batch_size = positive_int(batch_size, "batch_size")
    labels = [encode(tokenizer, w) for w in label_words]
    empty = [w for w, ids in zip(label_words, labels) if not ids]
    if empty:
        raise ValueError(f"label_words {empty!r} tokenize to nothing")
    prefix = bos_prefix(tokenizer)
    prompt_ids = [prefix + encode(tokenizer, p) for p in prompts]
    if any(not p for p in prompt_ids):
        raise ValueError("prompts must not tokenize to nothing (give the model at least one token)")
    single = all(len(ids) == 1 for ids in labels)
    if single:  # one sequence per prompt; score position = its last token
        seqs = [(p, len(p) - 1, None) for p in prompt_ids]
    else:  # one sequence per (prompt, label); score positions = before each label token
        seqs = [(p + lab, len(p) - 1, lab) for p in prompt_ids for lab in labels]
    first = torch.tensor([ids[0] for ids in labels])  # [C]
    scores = [None] * len(seqs)
    base, head, softcap = causal_parts(model)
    device, pad = model_device(model), pad_token_id(tokenizer)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))  # similar lengths share a batch
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress_bar(batches, desc="label scores", enabled=progress):
        ids, mask = right_padded([seqs[i][0] for i in batch], pad, device)  # [B, L]
        hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, D]
        for row, i in enumerate(batch):
            _, start, lab = seqs[i]
            if single:
                logp = torch.log_softmax(output_logits(head, softcap, hidden[row, start]), -1)  # [V]
                scores[i] = logp[first.to(device)].cpu()  # [C]
            else:
                pos = torch.arange(start, start + len(lab), device=device)  # [m]
                logp = torch.log_softmax(output_logits(head, softcap, hidden[row, pos]), -1)  # [m, V]
                target = torch.tensor(lab, device=device)  # [m]
                scores[i] = logp.gather(-1, target[:, None]).sum().cpu()
    if single:
        return torch.stack(scores).double().numpy() if scores else np.zeros((0, len(labels)))
    return torch.stack(scores).double().reshape(len(prompts), len(labels)).numpy()


def _label_softmax(logprobs):
    """Softmax over the label axis: label-word scores renormalised to a distribution over labels."""
    e = np.exp(logprobs - logprobs.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def contextual_calibration(logprobs, content_free_logprobs):
    """Calibrated label probabilities ``[N, C]`` (Zhao et al. 2021, contextual calibration).

    ``p = softmax(logprobs)`` over the C labels; ``p_cf`` is the mean over content-free
    prompts of the same; the result is ``p / p_cf`` renormalised (their ``W = diag(p_cf)^-1``,
    ``b = 0``).
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    cf = np.asarray(content_free_logprobs, dtype=np.float64)
    if lp.ndim != 2 or cf.ndim != 2 or cf.shape[1] != lp.shape[1] or cf.shape[0] == 0:
        raise ValueError(
            f"logprobs must be [N, C] and content_free_logprobs [M >= 1, C] with the same C, got "
            f"{lp.shape} and {cf.shape}"
        )
    p = _label_softmax(lp)  # [N, C]
    pcf = _label_softmax(cf).mean(0)  # [C]
    q = p / pcf
    return q / q.sum(-1, keepdims=True)


def classify(model, tokenizer, examples, *, template, labels, content_free=CONTENT_FREE, batch_size=16,
             progress=False):
    """Zero-shot classification of ``[(text, label)]`` by label-word scores.

    ``template`` has one ``{text}`` field; ``labels`` maps each label to its label word.
    Returns ``{"label", "raw", "calibrated"}`` (lists of label names: gold, argmax of the
    raw scores, argmax after contextual calibration) and ``"p_cf"`` (the content-free
    label distribution, a list in ``labels`` order).
    """
    if "{text}" not in template:
        raise ValueError(f"template must contain a {{text}} field, got {template!r}")
    names = list(labels)
    gold = [label for _, label in examples]
    unknown = sorted(set(gold) - set(names))
    if unknown:
        raise ValueError(f"examples have labels {unknown} that are not keys of labels {names}")
    if not content_free:
        raise ValueError("content_free must hold at least one content-free input, e.g. ('N/A',)")
    words = [labels[n] for n in names]
    lp = label_logprobs(model, tokenizer, [template.format(text=t) for t, _ in examples], words,
                        batch_size=batch_size, progress=progress)  # [N, C]
    cf = label_logprobs(model, tokenizer, [template.format(text=t) for t in content_free], words,
                        batch_size=batch_size)  # [M, C]
    q = contextual_calibration(lp, cf)
    pcf = _label_softmax(cf).mean(0)  # [C]
    return {
        "label": gold,
        "raw": [names[i] for i in lp.argmax(-1)],
        "calibrated": [names[i] for i in q.argmax(-1)],
        "p_cf": pcf.tolist(),
    }

