"""Key selectors measured against the exact top-k oracle: one API (``base``), the published rules by family.

A selector chooses, per query, the keys attention may use; the top-k kernel does the softmax
over them and the product with V (``base.sparse_attention``). ``topk_lib.hf.patching.use_sparse``
runs one inside a transformers model, prefill and decoding. Families: ``static`` (oracle top-k,
sinks + window, random), ``heavy`` (H2O, SnapKV: stateful), ``estimated`` (Quest, Loki, Double
Sparsity), ``adaptive`` (top-p, calibrated thresholds).
"""

__all__ = ["base", "static", "heavy", "estimated", "adaptive"]
