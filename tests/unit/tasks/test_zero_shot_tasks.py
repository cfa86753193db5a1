"""Zero-shot task building and scoring on tiny random models (topk_lib.tasks: scoring, classification, qa, passkey, retrieval)."""

import math

import numpy as np
import pytest
import torch
from tiny_models import TEXT

from topk_lib.tasks import classification, passkey, qa, retrieval, scoring
from topk_lib.tasks.lm import perplexity, token_windows
from topk_lib.hf.patching import use_topk


def _manual_last_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)  # [L, V]


# --------------------------------------------------------------------------- language modelling


def test_token_scores_match_lm_eval(llama, tok):
    windows = token_windows(tok, TEXT, window=40, n_windows=3)
    nll, ok = scoring.token_scores(llama, windows, chunk=7)
    assert nll.shape == ok.shape == (3, 39)
    ref = perplexity(llama, tok, TEXT, window=40, n_windows=3)
    assert math.isclose(nll.mean(), ref["nll"], rel_tol=1e-5)
    assert math.isclose(ok.mean(), ref["accuracy"], abs_tol=1e-9)
    nll2, _ = scoring.token_scores(llama, windows, chunk=512)
    np.testing.assert_allclose(nll, nll2, rtol=1e-5)


def test_token_scores_under_topk_match_lm_eval(llama, tok):
    windows = token_windows(tok, TEXT, window=40, n_windows=2)
    with use_topk(llama, attn_k=2, ff_k=8):
        nll, _ = scoring.token_scores(llama, windows)
    ref = perplexity(llama, tok, TEXT, window=40, n_windows=2, attn_k=2, ff_k=8)
    vanilla = perplexity(llama, tok, TEXT, window=40, n_windows=2)
    assert math.isclose(nll.mean(), ref["nll"], rel_tol=1e-5)
    assert abs(nll.mean() - vanilla["nll"]) > 1e-4


class _Tokenizer:
    """Just enough of a tokenizer for the BOS and pad rules: ids are characters, BOS optional."""

    def __init__(self, *, bos=None, adds_bos=False, pad=None, eos=None):
        self.bos_token_id, self.pad_token_id, self.eos_token_id, self.adds_bos = bos, pad, eos, adds_bos

    def __call__(self, text, add_special_tokens=True, verbose=False):
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if self.adds_bos and add_special_tokens else []) + ids}


def test_one_bos_and_pad_rule():
    adds = _Tokenizer(bos=1, adds_bos=True, eos=2)
    assert scoring.bos_prefix(adds) == [1] and scoring.pad_token_id(adds) == 2  # pad falls back to EOS
    assert scoring.bos_prefix(_Tokenizer(bos=1)) == [] and scoring.bos_prefix(_Tokenizer()) == []
    assert scoring.pad_token_id(_Tokenizer(pad=5, eos=2)) == 5 and scoring.pad_token_id(_Tokenizer()) == 0
    text = "abcdefgh" * 4
    assert token_windows(adds, text, window=4, n_windows=2)[:, 0].tolist() == [1, 1]  # windows follow the rule
    assert token_windows(_Tokenizer(bos=1), text, window=4, n_windows=2).shape == (2, 4)
    ex = passkey.passkey_example(adds, n_tokens=400, depth=0.5, passkey="12345")
    assert ex["input_ids"][0] == 1 and ex["input_ids"][1] == ord("T")  # so do the prompts


def test_token_scores_rejects_bad_windows(llama):
    with pytest.raises(ValueError, match="windows"):
        scoring.token_scores(llama, torch.zeros(5, dtype=torch.long))


# --------------------------------------------------------------------------- classification


PROMPTS = ["Review: a fine film\nSentiment:", "Review: dull and long , a waste\nSentiment:", "x:"]


def test_label_logprobs_single_token_matches_manual(llama, tok):
    words = [" positive", " negative", " good"]
    assert all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in words)
    got = classification.label_logprobs(llama, tok, PROMPTS, words, batch_size=2)
    for i, p in enumerate(PROMPTS):
        ids = tok(p, add_special_tokens=False)["input_ids"]
        lp = _manual_last_logprobs(llama, ids)[-1]
        want = [lp[tok(w, add_special_tokens=False)["input_ids"][0]].item() for w in words]
        np.testing.assert_allclose(got[i], want, rtol=1e-5, atol=1e-6)


def test_label_logprobs_multi_token_matches_manual_and_batching(llama, tok):
    words = [" positive", " unbelievably overwhelming"]
    label_ids = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
    assert len(label_ids[1]) > 1
    got = classification.label_logprobs(llama, tok, PROMPTS, words, batch_size=4)
    one = classification.label_logprobs(llama, tok, PROMPTS, words, batch_size=1)
    np.testing.assert_allclose(got, one, rtol=1e-5, atol=1e-6)  # right padding changes nothing
    for i, p in enumerate(PROMPTS):
        ids = tok(p, add_special_tokens=False)["input_ids"]
        for j, lab in enumerate(label_ids):
            lp = _manual_last_logprobs(llama, ids + lab)
            want = sum(lp[len(ids) - 1 + t, lab[t]].item() for t in range(len(lab)))
            assert math.isclose(got[i, j], want, rel_tol=1e-5, abs_tol=1e-5)
    # the one-token label scores the same on both paths
    single = classification.label_logprobs(llama, tok, PROMPTS, [" positive"])
    np.testing.assert_allclose(got[:, 0], single[:, 0], rtol=1e-5, atol=1e-6)


def test_label_logprobs_bad_arguments(llama, tok):
    with pytest.raises(ValueError, match="label_words"):
        classification.label_logprobs(llama, tok, PROMPTS, [])
    with pytest.raises(ValueError, match="batch_size"):
        classification.label_logprobs(llama, tok, PROMPTS, [" a"], batch_size=0)


def test_contextual_calibration_known_values():
    p = np.array([[0.6, 0.4], [0.7, 0.3]])
    cf = np.array([[0.65, 0.35]])
    q = classification.contextual_calibration(np.log(p), np.log(cf))
    # p / p_cf = [0.923, 1.143] and [1.077, 0.857]: the bias towards label 0 is removed
    want = np.array([[0.6 / 0.65, 0.4 / 0.35], [0.7 / 0.65, 0.3 / 0.35]])
    np.testing.assert_allclose(q, want / want.sum(1, keepdims=True))
    assert q.argmax(1).tolist() == [1, 0] and np.log(p).argmax(1).tolist() == [0, 0]
    # several content-free inputs: their label distributions are averaged
    cf2 = np.log(np.array([[0.5, 0.5], [0.8, 0.2]]))
    q2 = classification.contextual_calibration(np.log(p), cf2)
    np.testing.assert_allclose(q2, q)
    with pytest.raises(ValueError, match="content_free_logprobs"):
        classification.contextual_calibration(np.log(p), np.zeros((1, 3)))


def test_classify_agrees_with_label_logprobs(llama, tok):
    examples = [("a fine film", "pos"), ("dull and long", "neg"), ("the best", "pos")]
    out = classification.classify(llama, tok, examples, template=classification.POLARITY_TEMPLATE, labels=classification.POLARITY_LABELS)
    lp = classification.label_logprobs(llama, tok, [classification.POLARITY_TEMPLATE.format(text=t) for t, _ in examples],
                                 list(classification.POLARITY_LABELS.values()))
    cf = classification.label_logprobs(llama, tok, [classification.POLARITY_TEMPLATE.format(text=t) for t in classification.CONTENT_FREE],
                                 list(classification.POLARITY_LABELS.values()))
    names = list(classification.POLARITY_LABELS)
    assert out["label"] == ["pos", "neg", "pos"]
    assert out["raw"] == [names[i] for i in lp.argmax(1)]
    assert out["calibrated"] == [names[i] for i in classification.contextual_calibration(lp, cf).argmax(1)]
    assert math.isclose(sum(out["p_cf"]), 1.0)
    with pytest.raises(ValueError, match="labels"):
        classification.classify(llama, tok, [("x", "meh")], template=classification.POLARITY_TEMPLATE, labels=classification.POLARITY_LABELS)
    with pytest.raises(ValueError, match="template"):
        classification.classify(llama, tok, examples, template="no field", labels=classification.POLARITY_LABELS)


def test_balanced_sample():
    groups = {"a": [f"a{i}" for i in range(10)], "b": [f"b{i}" for i in range(5)]}
    s = classification.balanced_sample(groups, n_per_label=3, seed=1)
    assert [l for _, l in s] == ["a"] * 3 + ["b"] * 3 and len(set(s)) == 6
    assert s == classification.balanced_sample(groups, n_per_label=3, seed=1)
    assert classification.balanced_sample({"b": groups["b"]}, n_per_label=3, seed=1) == s[3:]  # labels independent
    with pytest.raises(ValueError, match="n_per_label"):
        classification.balanced_sample(groups, n_per_label=6)


# --------------------------------------------------------------------------- question answering


QUESTIONS = ["Who wrote Hamlet?", "What is the capital of France and why is it there?", "Year?"]


def test_generate_answers_batched_equals_single_and_manual_greedy(llama, tok):
    prompts = qa.qa_prompts(tok, QUESTIONS)
    assert prompts[0].endswith("Question: Who wrote Hamlet?\nAnswer:")  # no chat template: plain format
    batched = qa.generate_answers(llama, tok, prompts, max_new_tokens=6, batch_size=3)
    single = [qa.generate_answers(llama, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single  # left padding changes nothing
    ids = tok(prompts[2], add_special_tokens=False)["input_ids"]
    for _ in range(6):  # manual greedy loop without cache
        nxt = int(_manual_last_logprobs(llama, ids)[-1].argmax())
        ids.append(nxt)
        if nxt == llama.config.eos_token_id:
            break
    n_prompt = len(tok(prompts[2], add_special_tokens=False)["input_ids"])
    assert single[2] == tok.decode(ids[n_prompt:], skip_special_tokens=True)


def test_generate_answers_under_topk(llama, tok):
    prompts = qa.qa_prompts(tok, QUESTIONS)
    vanilla = qa.generate_answers(llama, tok, prompts, max_new_tokens=8)
    L = max(len(tok(p)["input_ids"]) for p in prompts) + 8
    with use_topk(llama, attn_k=L, ff_k=64):  # k >= L and k = d_ff are exact
        assert qa.generate_answers(llama, tok, prompts, max_new_tokens=8) == vanilla
    with use_topk(llama, attn_k=1, ff_k=2):
        assert qa.generate_answers(llama, tok, prompts, max_new_tokens=8) != vanilla


@pytest.mark.parametrize("pred, gold, want", [
    ("Richard Nixon", "Richard Nixon", (True, True)),
    (" The Soviet Union and the United States\n", "The Soviet Union and the United States.", (True, True)),
    ("It was Richard Nixon, in 1969.", "richard nixon", (False, True)),
    ("Sputnik", "Sputnik 1", (False, False)),
    ("1963 or 1964", "196", (False, False)),  # whole words only
    ("\n\nParis\nbecause", "Paris", (True, True)),  # first non-empty line
    ("anything", "", (False, False)),
])
def test_answer_scores(pred, gold, want):
    assert qa.answer_scores(pred, gold) == want


def test_normalize_answer():
    assert qa.normalize_answer("  The  Andromeda Galaxy. ") == "andromeda galaxy"
    assert qa.normalize_answer("A’s — “quoted”") == "as quoted"  # punctuation goes first, as in SQuAD


# --------------------------------------------------------------------------- passkey


@pytest.mark.parametrize("n_tokens", [120, 300])
@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_example_layout(tok, n_tokens, depth):
    ex = passkey.passkey_example(tok, n_tokens=n_tokens, depth=depth, passkey="48213")
    ids = ex["input_ids"]
    filler = len(tok(passkey.PASSKEY_FILLER, add_special_tokens=False)["input_ids"])
    assert n_tokens - filler < len(ids) == ex["n_tokens"] <= n_tokens
    assert tok.decode(ids[-ex["answer_len"]:]).replace(" ", "") == "48213"
    text = tok.decode(ids)
    assert text.count("48213") == 3  # twice in the needle, once as the answer
    assert "what is the pass key? the pass key is" in text  # uncased tokenizer
    # the needle sits at the requested depth of the filler
    head = len(tok(passkey.PASSKEY_INTRO, add_special_tokens=False)["input_ids"])
    needle = len(tok(passkey.PASSKEY_NEEDLE.format(key="48213"), add_special_tokens=False)["input_ids"])
    tail = len(tok(passkey.PASSKEY_QUESTION, add_special_tokens=False)["input_ids"]) + ex["answer_len"]
    span = len(ids) - head - needle - tail  # filler tokens
    assert abs((ex["needle_start"] - head) / span - depth) <= filler / span + 1e-9
    assert tok.decode(ids[ex["needle_start"]:ex["needle_start"] + needle]).startswith("the pass key is 48213")


def test_passkey_example_bad_arguments(tok):
    with pytest.raises(ValueError, match="depth"):
        passkey.passkey_example(tok, n_tokens=200, depth=1.5, passkey="12345")
    with pytest.raises(ValueError, match="n_tokens"):
        passkey.passkey_example(tok, n_tokens=20, depth=0.5, passkey="12345")
    with pytest.raises(ValueError, match="passkey"):
        passkey.passkey_example(tok, n_tokens=200, depth=0.5, passkey="12a45")
    with pytest.raises(TypeError, match="depth"):
        passkey.passkey_example(tok, n_tokens=200, depth="0.5", passkey="12345")


def test_passkey_examples_grid_is_deterministic(tok):
    a = passkey.passkey_examples(tok, lengths=[100, 200], depths=[0.1, 0.9], n_per_cell=2, seed=3)
    b = passkey.passkey_examples(tok, lengths=[200], depths=[0.9], n_per_cell=2, seed=3)
    assert len(a) == 8 and [e["length"] for e in a] == [100] * 4 + [200] * 4
    assert [e["passkey"] for e in a[-2:]] == [e["passkey"] for e in b]  # a cell's keys do not depend on the grid
    assert len({e["passkey"] for e in a}) > 4 and all(len(e["passkey"]) == 5 for e in a)


@pytest.mark.parametrize("attn_k", [None, 2])
def test_greedy_continuation_equals_generate(llama, tok, attn_k):
    """Teacher-forced argmax = what generate (KV cache, decode-time top-k) produces."""
    ex = passkey.passkey_example(tok, n_tokens=150, depth=0.3, passkey="77123")
    prompt = ex["input_ids"][: -ex["answer_len"]]
    with use_topk(llama, attn_k=attn_k), torch.no_grad():
        gen = llama.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        pred = passkey.greedy_continuation(llama, prompt + gen, answer_len=4)
        assert pred == gen
        wrong = prompt + gen[:3] + [(gen[3] + 1) % tok.vocab_size]
        assert passkey.greedy_continuation(llama, wrong, answer_len=4) != wrong[-4:]
    with pytest.raises(ValueError, match="answer_len"):
        passkey.greedy_continuation(llama, prompt[:3], answer_len=3)


# --------------------------------------------------------------------------- retrieval


def test_split_sentences():
    text = 'We met. "Is it true?" he asked. Yes! 1790 was a year. e.g. lower case stays'
    assert retrieval.split_sentences(text) == ["We met.", '"Is it true?" he asked.', "Yes!",
                                              "1790 was a year. e.g. lower case stays"]


def test_paragraph_pairs():
    sents = [f"Sentence number {i} has enough words in it." for i in range(12)]
    pairs = retrieval.paragraph_pairs([" ".join(sents)], n=4, sentences_per_paragraph=3, min_query_words=3)
    assert pairs == [(sents[i], " ".join(sents[i + 1 : i + 3])) for i in (0, 3, 6, 9)]
    with pytest.raises(ValueError, match="n=5"):
        retrieval.paragraph_pairs([" ".join(sents)], n=5, sentences_per_paragraph=3, min_query_words=3)
    with pytest.raises(ValueError, match="sentences_per_paragraph"):
        retrieval.paragraph_pairs(["x"], n=1, sentences_per_paragraph=1)


def test_retrieval_ranks_hand_made():
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    d = np.array([[2.0, 0.1], [1.0, 0.0], [1.0, 1.1]])
    # q0: d0 (0.9988) < d1 (1.0) -> rank 2; q1: d1 is worst -> 3; q2: d2 best -> 1
    assert retrieval.retrieval_ranks(q, d).tolist() == [2, 3, 1]
    same = np.ones((3, 2))
    assert retrieval.retrieval_ranks(same, same).tolist() == [3, 3, 3]  # ties count against
    with pytest.raises(ValueError, match="query_emb"):
        retrieval.retrieval_ranks(q, d[:2])


def test_retrieval_with_identical_texts_ranks_first(bert, tok):
    texts = ["the whale swam far", "congress passed the budget", "a dog in the rain", "taxes and tariffs"]
    e = retrieval.embed(bert, tok, texts)
    assert retrieval.retrieval_ranks(e, e).tolist() == [1, 1, 1, 1]
    shuffled = retrieval.embed(bert, tok, texts[1:] + texts[:1])
    assert (retrieval.retrieval_ranks(e, shuffled) > 1).all()
