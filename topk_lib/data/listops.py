"""ListOps from the Long Range Arena (Tay et al. 2021, section 3.1), generated offline.

The top-k paper (Gupta et al. 2021, section 4.1) trains on LRA ListOps to show that a
model trained with top-k attention reaches the accuracy of a vanilla one. The data
cannot be downloaded here, so this module re-implements the LRA generator
(``lra_benchmarks/data/listops.py``) and caches deterministic splits.

The task: evaluate a nested expression in bracketed prefix notation::

    [MAX 2 9 [MIN 4 7 ] 0 ]        -> 9

* Operators ``MAX``, ``MIN``, ``MED`` (median) and ``SM`` (sum modulo 10); operands 0-9;
  the label is the value, 0-9 (ten classes).
* LRA's tree: at each depth below ``max_depth`` a node is an operator with probability
  0.25 (else a digit), an operator has 2..``max_args`` arguments drawn uniformly, nodes at
  ``max_depth`` are digits. The root sits at depth 1, so nesting is at most ``max_depth``.
  Trees are drawn until their length falls in the requested range (rejection sampling).
* Length counts tokens as LRA does: a digit is 1, an operator adds 2 (its ``[OP`` and its
  ``]``). That is exactly the number of whitespace-separated tokens of the string.
  LRA keeps ``min_length < length < max_length``; here both bounds are inclusive.
* ``MED`` of an even count follows LRA's ``int(np.median(args))``: the mean of the two
  middle values, rounded down (``[MED 1 2 ]`` is 1, ``[MED 3 6 ]`` is 4).
* Duplicates are dropped (LRA collects trees in a set), across splits too, so no
  expression of the test split also appears in training.

LRA uses 500-2000 tokens and 96k/2k/2k examples; :func:`listops_splits` takes the
length range and sizes as arguments (the notebook picks what a 2-core CPU can train).
Splits are cached as TSV files under ``paths.results() / "listops"``; a manifest written
last marks a complete cache, so an interrupted run regenerates instead of reading half.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from topk_lib.infra import paths
from topk_lib.infra.cache import atomic_write

__all__ = [
    "OPERATORS",
    "VOCAB",
    "PAD_ID",
    "CLS_ID",
    "generate",
    "evaluate",
    "listops_splits",
    "label_distribution",
    "encode",
    "decode",
]

OPERATORS = ("MIN", "MAX", "MED", "SM")
VALUE_P = 0.25  # LRA: a node below max_depth is an operator with this probability
#: The token vocabulary: padding, a classification token, 4 operators, the closing bracket, 10 digits.
VOCAB = ("<pad>", "<cls>", *(f"[{op}" for op in OPERATORS), "]", *(str(d) for d in range(10)))
PAD_ID, CLS_ID = 0, 1
_TOKEN_ID = {tok: i for i, tok in enumerate(VOCAB)}
_SPLITS = ("train", "val", "test")
_MANIFEST = "manifest.json"


# --------------------------------------------------------------------------- generator


def apply_op(op: str, args: list[int]) -> int:
    """Value of one operator on its evaluated arguments (LRA semantics)."""
    if op == "MIN":
        return min(args)
    if op == "MAX":
        return max(args)
    if op == "SM":
        return sum(args) % 10
    if op == "MED":
        s = sorted(args)
        n = len(s)
        # LRA: int(np.median(...)); for an even count the mean of the middle two, floored
        return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) // 2
    raise ValueError(f"op must be one of {OPERATORS}, got {op!r}")


class _TooLong(Exception):
    pass


def _tree(rng: random.Random, depth: int, max_depth: int, max_args: int, out: list, budget: int) -> int:
    """Append one LRA tree's tokens to ``out`` and return its value; raise _TooLong past ``budget`` tokens."""
    if depth < max_depth and rng.random() <= VALUE_P:  # LRA: `r > VALUE_P` makes a digit
        n_args = rng.randint(2, max_args)
        op = rng.choice(OPERATORS)
        out.append(f"[{op}")
        args = [_tree(rng, depth + 1, max_depth, max_args, out, budget) for _ in range(n_args)]
        out.append("]")
        if len(out) > budget:  # stop early: a tree this long is rejected anyway
            raise _TooLong
        return apply_op(op, args)
    value = rng.randrange(10)
    out.append(str(value))
    if len(out) > budget:
        raise _TooLong
    return value


def _check_int(value, name, *, minimum):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_spec(min_length, max_length, max_depth, max_args):
    _check_int(min_length, "min_length", minimum=1)
    _check_int(max_length, "max_length", minimum=1)
    _check_int(max_depth, "max_depth", minimum=1)
    _check_int(max_args, "max_args", minimum=2)
    if max_length < min_length:
        raise ValueError(f"max_length ({max_length}) must be >= min_length ({min_length})")
    if min_length > 1 and max_depth == 1:
        raise ValueError(f"max_depth=1 only gives single digits (length 1); min_length={min_length} cannot be met")


def generate(n: int, *, min_length: int, max_length: int, max_depth: int = 10, max_args: int = 10,
             seed: int = 0, exclude=(), progress: bool = False) -> list[tuple[str, int]]:
    """``n`` distinct ``(expression, label)`` pairs with ``min_length <= tokens <= max_length``.

    Deterministic in ``seed``. ``exclude`` is a set of expressions not to return (other splits).
    """
    _check_int(n, "n", minimum=0)
    _check_spec(min_length, max_length, max_depth, max_args)
    rng = random.Random(seed)
    seen = set(exclude)
    found: list[tuple[str, int]] = []
    attempts = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"ListOps {min_length}-{max_length} tokens", unit="expr", leave=False)
    while len(found) < n:
        attempts += 1
        if attempts > 1000 * (n + 100):
            raise RuntimeError(
                f"ListOps: only {len(found)} of {n} expressions after {attempts} draws; the length range "
                f"{min_length}-{max_length} is too rare for max_depth={max_depth}, max_args={max_args}"
            )
        tokens: list[str] = []
        try:
            label = _tree(rng, 1, max_depth, max_args, tokens, max_length)
        except _TooLong:
            continue
        if len(tokens) < min_length:
            continue
        expr = " ".join(tokens)
        if expr in seen:
            continue
        seen.add(expr)
        found.append((expr, label))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return found


def evaluate(expr: str) -> int:
    """Value of a bracketed prefix expression (a stack machine, used to check stored labels)."""
    stack: list[list] = []
    result = None
    for tok in expr.split():
        if tok.startswith("["):
            op = tok[1:]
            if op not in OPERATORS:
                raise ValueError(f"expr: unknown operator {tok!r}")
            stack.append([op])
        elif tok == "]":
            if not stack or len(stack[-1]) < 2:
                raise ValueError(f"expr: ']' closes no operator with arguments in {expr!r}")
            op, *args = stack.pop()
            value = apply_op(op, args)
            if stack:
                stack[-1].append(value)
            elif result is None:
                result = value
            else:
                raise ValueError(f"expr: more than one top-level term in {expr!r}")
        elif tok.isdigit() and len(tok) == 1:
            if stack:
                stack[-1].append(int(tok))
            elif result is None:
                result = int(tok)
            else:
                raise ValueError(f"expr: more than one top-level term in {expr!r}")
        else:
            raise ValueError(f"expr: unknown token {tok!r}")
    if stack or result is None:
        raise ValueError(f"expr: unbalanced or empty expression {expr!r}")
    return result


# --------------------------------------------------------------------------- cached splits


def _split_dir(root, *, n_train, n_val, n_test, min_length, max_length, max_depth, max_args, seed) -> Path:
    root = Path(root) if root is not None else paths.results() / "listops"
    name = f"L{min_length}-{max_length}_depth{max_depth}_args{max_args}_n{n_train}-{n_val}-{n_test}_seed{seed}"
    return root / name


def listops_splits(*, n_train: int, n_val: int, n_test: int, min_length: int, max_length: int,
                   max_depth: int = 10, max_args: int = 10, seed: int = 0, root=None,
                   progress: bool = True) -> dict:
    """Train/val/test DataFrames (columns ``expr``, ``label``, ``length``), generated once and cached.

    The three splits come from one seeded stream of distinct trees (train first, then
    val, then test), like LRA. The cache folder under ``root`` (default
    ``paths.results() / "listops"``) is named after every argument, so changing one makes
    a new cache; an existing complete cache is read, never rewritten.
    """
    import pandas as pd

    for name, value in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
        _check_int(value, name, minimum=1)
    _check_spec(min_length, max_length, max_depth, max_args)
    _check_int(seed, "seed", minimum=0)
    spec = dict(n_train=n_train, n_val=n_val, n_test=n_test, min_length=min_length, max_length=max_length,
                max_depth=max_depth, max_args=max_args, seed=seed)
    folder = _split_dir(root, **spec)
    manifest = folder / _MANIFEST
    if not manifest.exists():
        pairs = generate(n_train + n_val + n_test, min_length=min_length, max_length=max_length,
                         max_depth=max_depth, max_args=max_args, seed=seed, progress=progress)
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(pairs))}
        folder.mkdir(parents=True, exist_ok=True)
        for split, (a, b) in bounds.items():
            lines = ["expr\tlabel"] + [f"{e}\t{y}" for e, y in pairs[a:b]]
            atomic_write(folder / f"{split}.tsv", "\n".join(lines) + "\n")
        atomic_write(manifest, json.dumps({"generator": "lra-listops-v1", **spec}, indent=1) + "\n")
    out = {}
    for split in _SPLITS:
        df = pd.read_csv(folder / f"{split}.tsv", sep="\t", dtype={"expr": str, "label": int})
        df["length"] = df.expr.str.count(" ") + 1
        out[split] = df
    return out


def label_distribution(splits: dict):
    """Fraction of each label (0-9) per split: a DataFrame indexed by label, one column per split."""
    import pandas as pd

    table = pd.DataFrame({name: df.label.value_counts(normalize=True) for name, df in splits.items()})
    return table.reindex(range(10)).fillna(0.0).rename_axis("label")


# --------------------------------------------------------------------------- tokenizer


def encode(exprs, *, cls: bool = True, pad_to: int | None = None):
    """Token ids ``[N, L]`` (int64) and a mask ``[N, L]`` (bool, True = real token).

    ``cls`` puts ``<cls>`` first (the classifier can pool it); rows are right-padded with
    ``<pad>`` to the longest expression, or to ``pad_to`` when given.
    """
    if isinstance(exprs, str):
        exprs = [exprs]
    rows = []
    for expr in exprs:
        try:
            ids = [_TOKEN_ID[t] for t in expr.split()]
        except KeyError as err:
            raise ValueError(f"exprs: unknown token {err.args[0]!r} (vocabulary: {' '.join(VOCAB[2:])})") from None
        rows.append([CLS_ID] + ids if cls else ids)
    length = max((len(r) for r in rows), default=0)
    if pad_to is not None:
        if pad_to < length:
            raise ValueError(f"pad_to={pad_to} is shorter than the longest encoded expression ({length} tokens)")
        length = pad_to
    ids = torch.full((len(rows), length), PAD_ID, dtype=torch.long)  # [N, L]
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, ids != PAD_ID  # [N, L], [N, L]


def decode(ids) -> list[str]:
    """Expressions back from ids ``[N, L]`` (padding and ``<cls>`` dropped)."""
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    return [" ".join(VOCAB[i] for i in row.tolist() if i not in (PAD_ID, CLS_ID)) for row in ids]
