"""Zero-shot tasks that score a pretrained model as it is: the tests behind accuracy-versus-k.

Gupta et al. (2021, section 4) claim top-k attention (and top-k feed-forward layers) can
replace the vanilla layers of a pretrained model *without corrective training*. This module
holds the task side of that test: how each task builds its inputs and how a model's
outputs are scored. Nothing here switches top-k on; callers wrap these functions in
:func:`topk_lib.hf.patching.use_topk` (``topk_lib.experiments.accuracy`` does, with caching). Every scorer
returns one number per example, so confidence intervals can be bootstrapped over examples.

Tasks
-----
* **Language modelling** (:func:`token_scores`): per-token negative log-likelihood and
  top-1 correctness on the windows of :func:`topk_lib.tasks.lm.token_windows`; their means
  are exactly what :func:`topk_lib.tasks.lm.perplexity` reports.
* **Classification by label words** (:func:`label_logprobs`, :func:`classify`): the
  log-probability of each label word after a prompt, calibrated against content-free
  prompts ("N/A", "", "[MASK]") as in Zhao et al. (2021), "Calibrate before use":
  ``q(y|x) ∝ p(y|x) / p_cf(y)`` where ``p`` is renormalised over the labels and ``p_cf`` is
  its mean over the content-free inputs. Templates and label words for 7-language
  identification and movie-review polarity are constants below.
* **Question answering by generation** (:func:`qa_prompts`, :func:`generate_answers`,
  :func:`answer_scores`): greedy decoding with the KV cache, scored by SQuAD-normalised
  exact match (first line of the answer) and answer containment (the normalised gold
  answer occurs, as whole words, in the normalised generated text).
* **Passkey retrieval** (:func:`passkey_example`, :func:`passkey_examples`,
  :func:`greedy_continuation`): a 5-digit key hidden in repeated filler text
  (Mohtashami & Jaggi 2023). Scoring is teacher-forced: greedy decoding returns the key
  exactly when the argmax at every answer position is the key's next token, so one
  forward pass replaces a generate loop and gives the same verdict.
* **Paragraph retrieval** (:func:`split_sentences`, :func:`paragraph_pairs`,
  :func:`retrieval_ranks`): query = a paragraph's first sentence, documents = the rest of
  every paragraph; rank of the right document by cosine similarity.

Causal-LM scoring runs the base model and applies the output embedding only where logits
are needed (the LM head on every position of a 4096-token window would hold a
``[4096, 49152]`` float tensor, 800 MB). That assumes ``logits = lm_head(last hidden
state)`` (plus ``final_logit_softcapping`` when the config has it), true for Llama-family
models such as SmolLM2.
"""

from __future__ import annotations

import numbers
import random
import re
import string

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "token_scores",
    "balanced_sample",
    "label_logprobs",
    "contextual_calibration",
    "classify",
    "LANGUAGE_LABELS",
    "LANGUAGE_TEMPLATE",
    "POLARITY_LABELS",
    "POLARITY_TEMPLATE",
    "CONTENT_FREE",
    "QA_SYSTEM",
    "qa_prompts",
    "generate_answers",
    "normalize_answer",
    "answer_scores",
    "PASSKEY_INTRO",
    "PASSKEY_FILLER",
    "PASSKEY_NEEDLE",
    "PASSKEY_QUESTION",
    "passkey_example",
    "passkey_examples",
    "greedy_continuation",
    "split_sentences",
    "paragraph_pairs",
    "retrieval_ranks",
]

# --------------------------------------------------------------------------- constants

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
#: System message of the trivia prompt (chat models); asks for short answers.
QA_SYSTEM = "Answer the question with a short phrase, no explanation."

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


# --------------------------------------------------------------------------- helpers


def _positive_int(value, arg):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{arg} must be a positive int, got {value!r}")
    return int(value)


def _progress(iterable, *, desc, enabled, total=None):
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False)


def _device(model):
    return next(model.parameters()).device


def _encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def _bos_prefix(tokenizer):
    """``[bos]`` when the tokenizer itself starts texts with BOS (then every prompt should), else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _pad_id(tokenizer):
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return 0 if pad is None else pad


def _causal_parts(model):
    """``(base model, output embedding, softcap)`` of a causal LM, checked once."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    base = getattr(model, "base_model", None)
    if head is None or base is None or base is model:
        raise ValueError(
            f"model must be a causal LM with a base model and an output embedding (e.g. LlamaForCausalLM), "
            f"got {type(model).__name__}"
        )
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return base, head, softcap


def _logits(head, softcap, hidden):
    logits = head(hidden).float()  # [..., V]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _right_padded(seqs, pad_id, device):
    """``ids [B, L]`` and ``attention_mask [B, L]`` for lists of token ids, padded on the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, L]
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


# --------------------------------------------------------------------------- language modelling


@torch.no_grad()
def token_scores(model, windows, *, chunk=512, progress=False):
    """Per-token NLL (nats) and top-1 correctness, each ``[n_windows, W - 1]`` numpy arrays.

    ``windows [n_windows, W]`` are token ids (:func:`topk_lib.tasks.lm.token_windows`); token
    ``t + 1`` of a window is predicted from tokens ``0 .. t``. Logits are formed ``chunk``
    positions at a time. Means over all entries equal ``lm_eval.perplexity``'s ``nll`` and
    ``accuracy`` on the same windows.
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError("windows must be a [n_windows, W] tensor of token ids with W >= 2")
    chunk = _positive_int(chunk, "chunk")
    base, head, softcap = _causal_parts(model)
    device = _device(model)
    nll, correct = [], []
    for row in _progress(windows, desc="windows", enabled=progress):
        ids = row.unsqueeze(0).to(device)  # [1, W]
        hidden = base(input_ids=ids).last_hidden_state[0, :-1]  # [W-1, D]: position t predicts t+1
        target = ids[0, 1:]  # [W-1]
        row_nll, row_ok = [], []
        for s in range(0, hidden.shape[0], chunk):
            logits = _logits(head, softcap, hidden[s : s + chunk])  # [c, V]
            row_nll.append(F.cross_entropy(logits, target[s : s + chunk], reduction="none"))  # [c]
            row_ok.append(logits.argmax(-1) == target[s : s + chunk])  # [c]
        nll.append(torch.cat(row_nll).cpu())
        correct.append(torch.cat(row_ok).cpu())
    return torch.stack(nll).numpy().astype(np.float64), torch.stack(correct).numpy()


# --------------------------------------------------------------------------- classification


def balanced_sample(groups, *, n_per_label, seed=0):
    """``[(text, label)]``: ``n_per_label`` texts drawn without replacement from each group.

    ``groups`` maps a label to its texts. Deterministic in ``seed`` (a string seed per label,
    so adding a label does not change the others' draws); labels in the order given.
    """
    n_per_label = _positive_int(n_per_label, "n_per_label")
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
    batch_size = _positive_int(batch_size, "batch_size")
    labels = [_encode(tokenizer, w) for w in label_words]
    empty = [w for w, ids in zip(label_words, labels) if not ids]
    if empty:
        raise ValueError(f"label_words {empty!r} tokenize to nothing")
    prefix = _bos_prefix(tokenizer)
    prompt_ids = [prefix + _encode(tokenizer, p) for p in prompts]
    if any(not p for p in prompt_ids):
        raise ValueError("prompts must not tokenize to nothing (give the model at least one token)")
    single = all(len(ids) == 1 for ids in labels)
    if single:  # one sequence per prompt; score position = its last token
        seqs = [(p, len(p) - 1, None) for p in prompt_ids]
    else:  # one sequence per (prompt, label); score positions = before each label token
        seqs = [(p + lab, len(p) - 1, lab) for p in prompt_ids for lab in labels]
    first = torch.tensor([ids[0] for ids in labels])  # [C]
    scores = [None] * len(seqs)
    base, head, softcap = _causal_parts(model)
    device, pad = _device(model), _pad_id(tokenizer)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))  # similar lengths share a batch
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in _progress(batches, desc="label scores", enabled=progress):
        ids, mask = _right_padded([seqs[i][0] for i in batch], pad, device)  # [B, L]
        hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, D]
        for row, i in enumerate(batch):
            _, start, lab = seqs[i]
            if single:
                logp = torch.log_softmax(_logits(head, softcap, hidden[row, start]), -1)  # [V]
                scores[i] = logp[first.to(device)].cpu()  # [C]
            else:
                pos = torch.arange(start, start + len(lab), device=device)  # [m]
                logp = torch.log_softmax(_logits(head, softcap, hidden[row, pos]), -1)  # [m, V]
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


# --------------------------------------------------------------------------- question answering


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
    max_new_tokens = _positive_int(max_new_tokens, "max_new_tokens")
    batch_size = _positive_int(batch_size, "batch_size")
    prefix = _bos_prefix(tokenizer)
    ids = [prefix + _encode(tokenizer, p) for p in prompts]
    pad = _pad_id(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    device = _device(model)
    out = [None] * len(prompts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in _progress(batches, desc="generate", enabled=progress):
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


# --------------------------------------------------------------------------- passkey


def passkey_example(tokenizer, *, n_tokens, depth, passkey):
    """One passkey prompt of at most ``n_tokens`` tokens, the key at relative ``depth``.

    Layout: intro, filler sentences, the needle (after ``round(depth * n_filler)`` filler
    repeats), the rest of the filler, the question, then the answer ``" " + passkey`` (the
    answer's tokens are part of ``input_ids`` for teacher-forced scoring). Returns
    ``{"input_ids", "answer_len", "passkey", "depth", "n_tokens", "needle_start"}``;
    ``n_tokens`` is the actual length, within one filler repeat of the requested one.
    """
    n_tokens = _positive_int(n_tokens, "n_tokens")
    if isinstance(depth, bool) or not isinstance(depth, numbers.Real) or not 0 <= depth <= 1:
        raise ValueError(f"depth must be a number in [0, 1] (0 = start, 1 = end), got {depth!r}")
    passkey = str(passkey)
    if not passkey.isdigit():
        raise ValueError(f"passkey must be a string of digits, got {passkey!r}")
    head = _bos_prefix(tokenizer) + _encode(tokenizer, PASSKEY_INTRO)
    filler = _encode(tokenizer, PASSKEY_FILLER)
    needle = _encode(tokenizer, PASSKEY_NEEDLE.format(key=passkey))
    question = _encode(tokenizer, PASSKEY_QUESTION)
    answer = _encode(tokenizer, " " + passkey)
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
    n_per_cell = _positive_int(n_per_cell, "n_per_cell")
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
    answer_len = _positive_int(answer_len, "answer_len")
    ids = torch.as_tensor(list(input_ids), dtype=torch.long)  # [L]
    if ids.dim() != 1 or ids.numel() <= answer_len:
        raise ValueError(f"input_ids must be a 1-D prompt longer than answer_len={answer_len}")
    base, head, softcap = _causal_parts(model)
    hidden = base(input_ids=ids[None].to(_device(model))).last_hidden_state  # [1, L, D]
    logits = _logits(head, softcap, hidden[0, -answer_len - 1 : -1])  # [answer_len, V]
    return logits.argmax(-1).cpu().tolist()


# --------------------------------------------------------------------------- retrieval

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
    n = _positive_int(n, "n")
    size = _positive_int(sentences_per_paragraph, "sentences_per_paragraph")
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

