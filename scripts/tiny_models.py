"""Save a tiny random Qwen2 decoder and a tiny BERT encoder, with tokenizers, for pipeline checks.

``python scripts/tiny_models.py OUT_DIR`` writes ``OUT_DIR/tiny-qwen2`` (four layers, two of them
in a 64-token sliding window) and ``OUT_DIR/tiny-bert``. The tokenizer is SmolLM2's when its
package is installed, else a byte-level BPE trained here on the built-in pydoc text, so the
models can be made on a machine without the suite's model packages.
"""

import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM


def tokenizer():
    try:
        from topk_lib import load_model

        return load_model("smollm2-135m")[1]
    except Exception:  # noqa: BLE001 - any failure means the package is not usable here
        from tokenizers import ByteLevelBPETokenizer

        from topk_lib.data import pydoc_text

        base = ByteLevelBPETokenizer()
        base.train_from_iterator([pydoc_text()], vocab_size=4000, special_tokens=["<|endoftext|>", "<pad>"])
        return PreTrainedTokenizerFast(tokenizer_object=base._tokenizer, bos_token="<|endoftext|>",
                                       eos_token="<|endoftext|>", pad_token="<pad>")


def main(out: Path) -> None:
    tok = tokenizer()
    torch.manual_seed(0)
    decoder = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, use_sliding_window=True, sliding_window=64,
        max_window_layers=2, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id))
    encoder = BertModel(BertConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, max_position_embeddings=512, pad_token_id=tok.pad_token_id))
    for name, model in (("tiny-qwen2", decoder), ("tiny-bert", encoder)):
        model.save_pretrained(out / name)
        tok.save_pretrained(out / name)
    print(f"saved {out / 'tiny-qwen2'} and {out / 'tiny-bert'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
