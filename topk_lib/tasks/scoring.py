"""Scoring a pretrained language model: the one token scorer and the one BOS/pad rule every task uses.

Causal-LM scoring runs the base model and applies the output embedding only where logits
are needed (the LM head on every position of a 4096-token window would hold a
``[4096, 49152]`` float tensor, 800 MB). That assumes ``logits = lm_head(last hidden
state)`` (plus ``final_logit_softcapping`` when the config has it), true for Llama-family
models such as SmolLM2 and for Gemma.

BOS rule: a prompt or window starts with BOS exactly when the tokenizer itself starts a
text with BOS (Gemma needs it; SmolLM2's and BERT's tokenizers add none). Padding uses the
pad token, else EOS, else id 0; padded positions are masked out, so the id never matters
for the scores.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from topk_lib._validate import positive_int

__all__ = [
    "token_scores",
    "bos_prefix",
    "pad_token_id",
    "encode",
    "causal_parts",
    "output_logits",
    "right_padded",
    "model_device",
    "progress_bar",
]


def progress_bar(iterable, *, desc, enabled, total=None):
    """A tqdm bar over ``iterable`` that disappears when done (hidden when not ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False)


def model_device(model):
    """The device of the model's first parameter (where its inputs go)."""
    return next(model.parameters()).device


def encode(tokenizer, text):
    """Token ids of ``text`` without special tokens (BOS is added by :func:`bos_prefix` where wanted)."""
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def bos_prefix(tokenizer):
    """``[bos]`` when the tokenizer itself starts texts with BOS (then every prompt should), else ``[]``."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def pad_token_id(tokenizer):
    """The id padded positions carry: the pad token, else EOS, else 0."""
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    return 0 if pad is None else pad


def causal_parts(model):
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


def output_logits(head, softcap, hidden):
    """Float32 logits ``[..., V]`` of hidden states ``[..., D]``, soft-capped as the model does."""
    logits = head(hidden).float()  # [..., V]
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def right_padded(seqs, pad_id, device):
    """``ids [B, L]`` and ``attention_mask [B, L]`` for lists of token ids, padded on the right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # [B, L]
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # [B, L]
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def token_scores(model, windows, *, chunk=512, progress=False):
    """Per-token negative log-likelihood and top-1 correctness of a causal LM on token windows.

    Arguments:
        model: a causal LM (base model + output embedding, see :func:`causal_parts`).
        windows: ``[n_windows, W]`` token ids (:func:`topk_lib.tasks.lm.token_windows`), W >= 2;
            token ``t + 1`` of a window is predicted from tokens ``0 .. t``, with no context
            carried across windows.
        chunk: logits are formed this many positions at a time.
        progress: show a progress bar over the windows.

    Returns:
        ``(nll, correct)``: numpy arrays ``[n_windows, W - 1]``, NLL in nats (float64) and
        whether the argmax token is the next token (bool).
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError("windows must be a [n_windows, W] tensor of token ids with W >= 2")
    chunk = positive_int(chunk, "chunk")
    base, head, softcap = causal_parts(model)
    device = model_device(model)
    nll, correct = [], []
    for row in progress_bar(windows, desc="windows", enabled=progress):
        ids = row.unsqueeze(0).to(device)  # [1, W]
        hidden = base(input_ids=ids).last_hidden_state[0, :-1]  # [W-1, D]: position t predicts t+1
        target = ids[0, 1:]  # [W-1]
        row_nll, row_ok = [], []
        for s in range(0, hidden.shape[0], chunk):
            logits = output_logits(head, softcap, hidden[s : s + chunk])  # [c, V]
            row_nll.append(F.cross_entropy(logits, target[s : s + chunk], reduction="none"))  # [c]
            row_ok.append(logits.argmax(-1) == target[s : s + chunk])  # [c]
        nll.append(torch.cat(row_nll).cpu())
        correct.append(torch.cat(row_ok).cpu())
    return torch.stack(nll).numpy().astype(np.float64), torch.stack(correct).numpy()
