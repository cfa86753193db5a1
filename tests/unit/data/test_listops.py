"""ListOps generator: labels checked by an independent evaluator, hand-written values, determinism, bounds, cache."""

import re
import statistics

import pytest
import torch

from topk_lib.data import listops


def python_value(expr: str) -> int:
    """Independent evaluator: rewrite the expression as a Python call tree and eval it.

    MED follows LRA's ``int(np.median(args))``, written here with ``statistics.median``.
    """
    fns = {
        "MAX": lambda *a: max(a),
        "MIN": lambda *a: min(a),
        "SM": lambda *a: sum(a) % 10,
        "MED": lambda *a: int(statistics.median(a)),
    }
    src = re.sub(r"\[(MAX|MIN|MED|SM)", r"\1(", expr)
    src = src.replace("]", ")")
    src = ",".join(src.split()).replace("(,", "(")  # tokens -> comma separated call arguments
    return eval(src, {"__builtins__": {}}, fns)  # noqa: S307 - our own generated strings


HAND = [
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN 4 7 ]", 4),
    ("[SM 8 9 ]", 7),
    ("[SM 1 2 3 4 ]", 0),
    ("[MED 1 5 9 ]", 5),
    ("[MED 1 2 ]", 1),  # even count: mean of the middle two (1.5), floored as LRA's int(np.median)
    ("[MED 3 6 ]", 4),  # 4.5 -> 4
    ("[MED 9 0 7 2 ]", 4),  # sorted 0 2 7 9: (2 + 7) / 2 = 4.5 -> 4
    ("[MED 8 8 ]", 8),
    ("[MAX [SM 5 5 ] [MIN 3 [MED 7 1 ] ] ]", 3),  # SM 0, MED(7,1)=4, MIN 3 -> MAX 3
    ("7", 7),
]


@pytest.mark.parametrize("expr,value", HAND)
def test_hand_written_expressions(expr, value):
    assert listops.evaluate(expr) == value
    assert python_value(expr) == value


@pytest.mark.parametrize("lengths", [(1, 40), (20, 64), (64, 128), (300, 500)])
def test_generator_labels_match_independent_evaluator(lengths):
    lo, hi = lengths
    pairs = listops.generate(150, min_length=lo, max_length=hi, seed=3)
    for expr, label in pairs:
        assert python_value(expr) == label, expr
        assert listops.evaluate(expr) == label, expr
        assert 0 <= label <= 9


def test_length_depth_and_argument_bounds():
    pairs = listops.generate(200, min_length=30, max_length=90, max_depth=6, max_args=5, seed=1)
    for expr, _ in pairs:
        tokens = expr.split()
        assert 30 <= len(tokens) <= 90
        depth = deepest = 0
        args = []  # argument count of each open operator
        for tok in tokens:
            if tok.startswith("["):
                if args:
                    args[-1] += 1
                depth += 1
                deepest = max(deepest, depth)
                args.append(0)
            elif tok == "]":
                assert 2 <= args.pop() <= 5
                depth -= 1
            else:
                args[-1] += 1
        # the root sits at depth 1 and nodes at max_depth are digits: at most 5 nested operators
        assert deepest <= 5
    assert len({e for e, _ in pairs}) == len(pairs)


def test_all_operators_and_labels_occur():
    pairs = listops.generate(400, min_length=20, max_length=80, seed=0)
    text = " ".join(e for e, _ in pairs)
    for op in listops.OPERATORS:
        assert f"[{op} " in text
    assert {y for _, y in pairs} == set(range(10))


def test_deterministic_in_seed():
    a = listops.generate(50, min_length=10, max_length=60, seed=7)
    b = listops.generate(50, min_length=10, max_length=60, seed=7)
    c = listops.generate(50, min_length=10, max_length=60, seed=8)
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"min_length": 50, "max_length": 10}, "max_length"),
        ({"min_length": 0, "max_length": 10}, "min_length"),
        ({"min_length": 5, "max_length": 10, "max_args": 1}, "max_args"),
        ({"min_length": 5, "max_length": 10, "max_depth": 1}, "max_depth"),
    ],
)
def test_bad_arguments_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        listops.generate(3, **kw)


def test_evaluate_rejects_malformed():
    for bad in ["[MAX 1 2", "[FOO 1 2 ]", "1 2", "[MAX ]", "]"]:
        with pytest.raises(ValueError, match="expr"):
            listops.evaluate(bad)


def test_splits_cached_disjoint_and_deterministic(tmp_path, monkeypatch):
    kw = dict(n_train=60, n_val=10, n_test=10, min_length=10, max_length=40, seed=2, progress=False)
    first = listops.listops_splits(root=tmp_path, **kw)
    assert [len(first[s]) for s in ("train", "val", "test")] == [60, 10, 10]
    exprs = [set(first[s].expr) for s in ("train", "val", "test")]
    assert not (exprs[0] & exprs[1] or exprs[0] & exprs[2] or exprs[1] & exprs[2])
    for df in first.values():
        assert df.length.between(10, 40).all()
        assert [listops.evaluate(e) for e in df.expr] == list(df.label)
    folder = next(tmp_path.iterdir())
    assert (folder / "manifest.json").exists()
    assert not list(folder.glob(".*tmp"))

    def boom(*a, **k):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(listops, "generate", boom)
    again = listops.listops_splits(root=tmp_path, **kw)
    for s in first:
        assert first[s].equals(again[s])
    monkeypatch.undo()
    # a fresh folder with the same arguments gives the same data
    other = listops.listops_splits(root=tmp_path / "other", **kw)
    assert first["test"].equals(other["test"])


def test_incomplete_cache_is_regenerated(tmp_path):
    kw = dict(n_train=20, n_val=5, n_test=5, min_length=10, max_length=40, progress=False)
    first = listops.listops_splits(root=tmp_path, **kw)
    folder = next(tmp_path.iterdir())
    (folder / "manifest.json").unlink()
    (folder / "test.tsv").write_text("expr\tlabel\n")  # a half-written cache
    assert listops.listops_splits(root=tmp_path, **kw)["test"].equals(first["test"])


def test_label_distribution_sums_to_one(tmp_path):
    splits = listops.listops_splits(n_train=40, n_val=10, n_test=10, min_length=5, max_length=30, root=tmp_path,
                                    progress=False)
    table = listops.label_distribution(splits)
    assert list(table.index) == list(range(10))
    assert table.sum().round(6).eq(1.0).all()


def test_tokenizer_roundtrip_and_vocab():
    assert len(listops.VOCAB) == 17
    exprs = ["[MAX 2 9 [MIN 4 7 ] 0 ]", "[SM 1 2 ]"]
    ids, mask = listops.encode(exprs)
    assert ids.shape == (2, 10) and ids.dtype == torch.long
    assert ids[0, 0] == listops.CLS_ID and mask.sum(1).tolist() == [10, 5]
    assert (ids[~mask] == listops.PAD_ID).all()
    assert listops.decode(ids) == exprs
    ids2, _ = listops.encode(exprs, cls=False, pad_to=12)
    assert ids2.shape == (2, 12)
    with pytest.raises(ValueError, match="unknown token"):
        listops.encode(["[MAX 12 3 ]"])
    with pytest.raises(ValueError, match="pad_to"):
        listops.encode(exprs, pad_to=3)
