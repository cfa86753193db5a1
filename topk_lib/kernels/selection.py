"""Per-row top-k selection for the attention kernels (Gupta et al. 2021, section 3.1).

Selecting the ``k`` largest scores of each query row costs more than computing them: on CPU
``torch.topk`` takes up to 2.3 times as long as the Q.K^T product of the same chunk. numpy's
introselect (``argpartition``) releases the GIL, so blocks of rows run in parallel threads;
on CPU float32/float64 that is 1.4-3.5x faster than ``torch.topk``. Elsewhere (CUDA, half
precision, ``k >= n``) ``torch.topk`` runs. On CPU float32/float64 with a C++ compiler,
:func:`~topk_lib.kernels.attention.topk_attention`'s forward does not call it at all: it fuses
the scores with a compiled selection (:mod:`.scan`, :mod:`.native`) and only lends this
selector's threads; ``RowSelector(method="chunked")`` keeps the path below.

One chunk of 12 heads x 1024 queries, d=64, k=128, float32, median ms of 5 on this project's
2-core CPU (AMD EPYC, torch 2.13.0, 2 threads; ``python -m topk_lib.bench product``):

=======================================  =========  =========  ==========
operation                                Lk=2048    Lk=8192    Lk=16384
=======================================  =========  =========  ==========
Q.K^T of the same chunk, for scale       41.3       176.9      379.1
torch.topk (unsorted)                    95.2       246.9      319.6
=======================================  =========  =========  ==========

Dimensions
----------
``R``   rows to select from (all batch dims, heads and queries of a chunk); ``n`` entries per row;
``k``   entries kept per row
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from topk_lib._validate import positive_int

__all__ = ["RowSelector", "DEFAULT_SELECTOR"]

BLOCK_ROWS = 256  # argpartition returns all n int64 indices of a row: blocks bound that scratch


class RowSelector:
    """Selects the ``k`` largest entries of each row; owns the worker threads it uses.

    ``threads=None`` uses ``torch.get_num_threads()`` at each call. Threads start on the
    first call that has more than one block of rows and live until :meth:`close` (or the
    end of a ``with`` block); reused across calls, a selector keeps them.

    ``method`` says how :func:`~topk_lib.kernels.attention.topk_attention`'s forward selects:
    ``"auto"`` fuses the scores with the compiled selection (:mod:`.scan`, :mod:`.native`)
    where it runs (CPU float32/float64, a C++ compiler) and scores whole chunks then calls
    this selector elsewhere; on CUDA ``"auto"`` runs the threshold path of :mod:`.flex` where it
    applies. ``"chunked"`` always does the latter (the path before the fused and the threshold
    ones, kept to compare against). All keep the same entries up to ties.
    """

    METHODS = ("auto", "chunked")
    #: ``topk >= Lk`` may run exact attention instead: true of the top-k, which then keeps every
    #: key; a subclass that chooses by another rule (:meth:`rows`) sets it False.
    exact_at_full_width = True

    def __init__(self, threads: int | None = None, method: str = "auto"):
        self.threads = None if threads is None else positive_int(threads, "threads")
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}")
        self.method = method
        self._pool, self._pool_size = None, 0

    def thread_count(self) -> int:
        """How many threads a call may use now."""
        return self.threads or torch.get_num_threads()

    def workers(self, threads: int):
        """The pool of at least ``threads`` worker threads (started, or grown, on demand)."""
        return self._workers(threads)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        """Stop the worker threads (a later call starts new ones)."""
        if self._pool is not None:
            self._pool.shutdown()
            self._pool, self._pool_size = None, 0

    def __call__(self, scores, k):
        """The ``k`` largest entries of each row of ``scores [..., n]``, in no particular order.

        Returns ``(values [..., k], indices [..., k])``, indices int64. Ties at the k-th value
        are broken by whichever backend runs (numpy or ``torch.topk``): only the values kept
        are well defined.
        """
        if scores.device.type != "cpu" or scores.dtype not in (torch.float32, torch.float64) or k >= scores.shape[-1]:
            return scores.topk(k, dim=-1, sorted=False)
        rows = scores.reshape(-1, scores.shape[-1]).numpy()  # [R, n], a view
        n = rows.shape[-1]
        blocks = np.array_split(rows, max(1, rows.shape[0] // BLOCK_ROWS))

        def select(block):  # copy: the slice would keep each block's [256, n] index array alive
            return np.argpartition(block, n - k, axis=-1)[:, n - k :].copy()  # [rows of block, k]

        threads = min(self.threads or torch.get_num_threads(), len(blocks))
        if threads <= 1:
            idx = np.concatenate([select(b) for b in blocks])  # [R, k]
        else:
            idx = np.concatenate(list(self._workers(threads).map(select, blocks)))  # [R, k]
        vals = np.take_along_axis(rows, idx, axis=-1)  # [R, k]
        shape = (*scores.shape[:-1], k)
        return torch.from_numpy(vals).view(shape), torch.from_numpy(idx).view(shape)

    def rows(self, scores, k, r0, r1):
        """The kept ``(values [..., c, k], indices [..., c, k])`` of the chunk of query rows ``r0:r1``.

        ``scores [..., Hkv, G, c, n]`` are that chunk's masked scores. The top-k here; a subclass
        may keep other entries (with value ``-inf`` for an unused slot, which the kernel drops),
        so that the softmax over the kept entries and the product with V stay the kernel's.
        """
        return self(scores, k)

    def _workers(self, threads):
        if self._pool_size < threads:  # grow; a call still mapping on the old pool finishes there
            self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="topk")
            self._pool_size = threads
        return self._pool


#: The selector :func:`~topk_lib.kernels.attention.topk_attention` uses when given none. Its
#: threads persist across calls: starting them for every call costs more than selecting from
#: a small chunk.
DEFAULT_SELECTOR = RowSelector()
