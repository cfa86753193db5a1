"""What a sweep switches to top-k: one :class:`Setting` per point, the same for every experiment.

A setting is vanilla, attention top-k (one k for every layer and head, or a per-head
``budget``), feed-forward top-k (``ff``), or ``both``. Its :attr:`Setting.name` is the
stem of its cache file and its :meth:`Setting.config` part of the cache key, so a setting
always finds its own cached result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from topk_lib._validate import optional_k

__all__ = ["KINDS", "Setting", "settings_grid"]

#: What a setting switches to top-k.
KINDS = ("vanilla", "attention", "ff", "both", "budget")

# kind -> (attn_k set, ff_k set)
_NEEDS = {"vanilla": (False, False), "attention": (True, False), "ff": (False, True), "both": (True, True),
          "budget": (True, False)}


@dataclass(frozen=True)
class Setting:
    """One point of a sweep. Build with :func:`settings_grid`, :meth:`of` or :meth:`budget`.

    ``attn_k``: None, an int (every layer and head) or, for ``kind="budget"``, a sorted tuple
    of ``((layer, head), k)`` pairs. ``ff_k``: None or an int. ``nominal_k``: the average k a
    budget was scaled to (its real mean after rounding is :attr:`x`).
    """

    kind: str
    attn_k: object = None
    ff_k: int | None = None
    nominal_k: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        need = _NEEDS[self.kind]
        if (self.attn_k is not None, self.ff_k is not None) != need:
            raise ValueError(f"a {self.kind!r} setting needs attn_k {'set' if need[0] else 'None'} and "
                             f"ff_k {'set' if need[1] else 'None'}, got attn_k={self.attn_k!r}, ff_k={self.ff_k!r}")
        if self.kind == "budget" and not isinstance(self.attn_k, tuple):
            raise ValueError("a 'budget' setting's attn_k must be a tuple of ((layer, head), k); use Setting.budget")

    @classmethod
    def of(cls, attn_k=None, ff_k=None):
        """The setting of one attention k and one feed-forward k, each an int or None (vanilla)."""
        attn_k, ff_k = optional_k(attn_k, "attn_k"), optional_k(ff_k, "ff_k")
        kind = {(False, False): "vanilla", (True, False): "attention", (False, True): "ff",
                (True, True): "both"}[(attn_k is not None, ff_k is not None)]
        return cls(kind, attn_k=attn_k, ff_k=ff_k)

    @classmethod
    def budget(cls, budget, *, nominal_k=None):
        """A per-head budget ``{(layer, head): k}`` as a setting."""
        if not isinstance(budget, dict) or not budget:
            raise ValueError("budget must be a non-empty {(layer, head): k} dict")
        items = tuple(sorted(((int(l), int(h)), optional_k(k, f"budget[{(l, h)}]")) for (l, h), k in budget.items()))
        return cls("budget", attn_k=items, nominal_k=None if nominal_k is None else float(nominal_k))

    @property
    def name(self):
        """Short label, also the cache file's stem: ``vanilla``, ``attn8``, ``ff96``, ``attn8_ff96``, ``budget8``."""
        if self.kind == "vanilla":
            return "vanilla"
        if self.kind == "budget":
            return f"budget{self.nominal_k if self.nominal_k is not None else self.x:g}"
        parts = ([f"attn{self.attn_k}"] if self.attn_k is not None else []) + (
            [f"ff{self.ff_k}"] if self.ff_k is not None else [])
        return "_".join(parts)

    @property
    def x(self):
        """The k this setting is plotted at: attention k (budget: its mean), ff k for ``ff``, NaN for vanilla."""
        if self.kind == "vanilla":
            return math.nan
        if self.kind == "ff":
            return float(self.ff_k)
        if self.kind == "budget":
            return float(np.mean([k for _, k in self.attn_k]))
        return float(self.attn_k)

    def topk(self):
        """Keyword arguments for :func:`topk_lib.hf.patching.use_topk`."""
        attn = dict(self.attn_k) if self.kind == "budget" else self.attn_k
        return {"attn_k": attn, "ff_k": self.ff_k}

    def config(self):
        """JSON-able description (part of the cache key)."""
        attn = [[l, h, k] for (l, h), k in self.attn_k] if self.kind == "budget" else self.attn_k
        return {"kind": self.kind, "attn_k": attn, "ff_k": self.ff_k, "nominal_k": self.nominal_k}


def settings_grid(*, attn_ks=(), ff_ks=(), both=(), budgets=None):
    """Vanilla first, then one setting per attention k, ff k, ``(attn_k, ff_k)`` pair and budget.

    ``budgets`` maps a nominal average k to a ``{(layer, head): k}`` budget.
    """
    out = [Setting("vanilla")]
    out += [Setting("attention", attn_k=optional_k(k, "attn_ks")) for k in attn_ks]
    out += [Setting("ff", ff_k=optional_k(k, "ff_ks")) for k in ff_ks]
    for pair in both:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"both must hold (attn_k, ff_k) pairs, got {pair!r}")
        out.append(Setting("both", attn_k=optional_k(pair[0], "both"), ff_k=optional_k(pair[1], "both")))
    out += [Setting.budget(b, nominal_k=k) for k, b in (budgets or {}).items()]
    if len({s.name for s in out}) != len(out):
        raise ValueError("settings_grid: two settings share a name; remove duplicate ks")
    return out
