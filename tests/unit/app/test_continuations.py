"""Continuations under decode-time top-k (topk_lib.app.continuations): against generate() run directly, the cache
(one generation per (prompt, length, attention), shorter requests served as prefixes) and progress reports."""

import pytest
import torch

from topk_lib.app.continuations import (
    ContinuationCache,
    Continuations,
    compare_continuations,
    continuations_html,
    continuations_text,
    first_divergence,
)
from topk_lib.hf.patching import use_topk


def _generate(model, tok, prompt, n, k=None):
    """Reference: greedy generate() called directly, under use_topk when k is given."""
    ids = tok(prompt, return_tensors="pt").input_ids
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if k is None:
            return model.generate(ids, **kw)[0, ids.shape[1]:].tolist()
        with use_topk(model, attn_k=k):
            return model.generate(ids, **kw)[0, ids.shape[1]:].tolist()



@pytest.mark.parametrize("a, b, expected", [
    ([1, 2, 3], [1, 2, 3], None),
    ([1, 2, 3], [1, 5, 3], 1),
    ([4], [5], 0),
    ([1, 2], [1, 2, 3], 2),  # one stopped early
    ([], [], None),
])
def test_first_divergence(a, b, expected):
    assert first_divergence(a, b) == expected


def test_continuations_large_k_are_identical(llama, tok):
    result = compare_continuations(llama, tok, "the cat sat on the mat", k=1000, max_new_tokens=6)
    assert result.diverge is None and result.vanilla == result.topk and len(result.vanilla) == 6
    assert result.prompt_tokens == len(tok("the cat sat on the mat").input_ids)


def test_continuations_match_generate_under_use_topk(llama, tok):
    prompt = "the whale sat on the old mat number 3. the dog"
    result = compare_continuations(llama, tok, prompt, k=2, max_new_tokens=8)
    ids = tok(prompt, return_tensors="pt").input_ids
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        vanilla = llama.generate(ids, **kw)[0, ids.shape[1]:].tolist()
        with use_topk(llama, attn_k=2):
            approx = llama.generate(ids, **kw)[0, ids.shape[1]:].tolist()
    assert result.vanilla == vanilla and result.topk == approx
    assert result.diverge == first_divergence(vanilla, approx)


def test_continuations_reject_encoders_and_bad_k(bert, llama, tok):
    with pytest.raises(ValueError, match="model"):
        compare_continuations(bert, tok, "hello there", k=4)
    with pytest.raises(ValueError, match="k must be"):
        compare_continuations(llama, tok, "hello there", k=0)
    with pytest.raises(ValueError, match="prompt"):
        compare_continuations(llama, tok, "  ", k=4)


def test_continuations_html_marks_divergence(tok):
    same = tok("the cat sat", add_special_tokens=False).input_ids
    result = Continuations(k=4, prompt_tokens=3, vanilla=same + tok(" on <b>", add_special_tokens=False).input_ids,
                           topk=same + tok(" under", add_special_tokens=False).input_ids, diverge=len(same))
    page = continuations_html(result, tok, prompt="a <prompt>")
    assert "top-4" in page and f"token {len(same)}" in page
    assert "<b>" not in page.split("</b>", 1)[1] and "&lt;prompt&gt;" in page  # escaped
    assert page.count("border-left") == 2
    assert "⟦" in continuations_text(result, tok)




PROMPT = "the whale sat on the old mat number 3. the dog"


def test_cache_generates_each_continuation_once(llama, tok):
    cache, reports = ContinuationCache(), []
    first = compare_continuations(llama, tok, PROMPT, k=2, max_new_tokens=8, cache=cache,
                                  progress=lambda *r: reports.append(r))
    assert cache.generated == 2
    assert reports == [("exact", i, 8) for i in range(1, 9)] + [("top-2", i, 8) for i in range(1, 9)]
    reports.clear()
    again = compare_continuations(llama, tok, PROMPT, k=2, max_new_tokens=8, cache=cache,
                                  progress=lambda *r: reports.append(r))
    assert again == first and cache.generated == 2 and reports == []  # nothing generated
    other_k = compare_continuations(llama, tok, PROMPT, k=3, max_new_tokens=8, cache=cache)
    assert cache.generated == 3  # only the top-3 one: the exact continuation does not depend on k
    assert other_k.vanilla == first.vanilla and other_k.topk == _generate(llama, tok, PROMPT, 8, k=3)
    shorter = compare_continuations(llama, tok, PROMPT, k=2, max_new_tokens=5, cache=cache)
    assert cache.generated == 3  # a prefix of the 8-token ones
    assert shorter.vanilla == _generate(llama, tok, PROMPT, 5) and shorter.topk == _generate(llama, tok, PROMPT, 5, k=2)
    longer = compare_continuations(llama, tok, PROMPT, k=2, max_new_tokens=10, cache=cache)
    assert cache.generated == 5 and longer.vanilla == _generate(llama, tok, PROMPT, 10)
    assert compare_continuations(llama, tok, PROMPT, k=2, max_new_tokens=8, cache=cache) == first
    assert cache.generated == 5


def test_cache_serves_a_continuation_that_stopped_at_eos():
    cache = ContinuationCache(entries=2)
    cache.put("p", False, None, 8, [5, 6, 102])  # stopped at EOS after 3 of 8
    assert cache.get("p", False, None, 20) == [5, 6, 102]  # a longer request stops there too
    cache.put("q", False, None, 4, [1, 2, 3, 4])
    assert cache.get("q", False, None, 6) is None  # 4 were asked and 4 came: the 5th is unknown
    assert cache.get("q", False, None, 2) == [1, 2]
    cache.put("r", False, 4, 4, [1])
    assert cache.get("p", False, None, 8) is None  # dropped: the least recently used of three entries
    with pytest.raises(ValueError, match="entries"):
        ContinuationCache(entries=0)
