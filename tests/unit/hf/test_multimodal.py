"""Image-text models: the language model's layers are numbered from 0, the vision tower stays exact.

Tiny random Gemma-3 (4B+ layout: SigLIP tower + Gemma-3 text model), LLaVA (CLIP + Llama) and
Qwen2-VL. A text prompt runs only the language model; an image also runs the tower, whose
output is compared bit for bit with the untouched model's.
"""

import pytest
import torch
import transformers as T

from topk_lib import use_topk
from topk_lib.hf.layers import describe_layers
from topk_lib.hf.patching import ATTN_IMPLEMENTATION
from topk_lib.hf.registry import attention_handler

TEXT = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
              patch_size=4)
IMAGE_TOKEN = 299


def tiny_gemma3():
    cfg = T.Gemma3Config(text_config={**TEXT, "sliding_window": 4}, vision_config=VISION, mm_tokens_per_image=4,
                         image_token_index=IMAGE_TOKEN, boi_token_index=297, eoi_token_index=298)
    return T.Gemma3ForConditionalGeneration(cfg), 4


def tiny_llava():
    cfg = T.LlavaConfig(text_config={**TEXT, "model_type": "llama"},
                        vision_config={**VISION, "model_type": "clip_vision_model", "projection_dim": 16},
                        image_token_index=IMAGE_TOKEN)
    return T.LlavaForConditionalGeneration(cfg), 16


def tiny_qwen2_vl():
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
    cfg = T.Qwen2VLConfig(text_config={**TEXT, "rope_parameters": rope}, image_token_id=IMAGE_TOKEN,
                          video_token_id=298, vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2,
                                                                 in_chans=3, patch_size=2, spatial_merge_size=1,
                                                                 temporal_patch_size=1))
    return T.Qwen2VLForConditionalGeneration(cfg), None


MODELS = {"gemma3": tiny_gemma3, "llava": tiny_llava, "qwen2_vl": tiny_qwen2_vl}


@pytest.fixture(scope="module", params=sorted(MODELS))
def vlm(request):
    torch.manual_seed(0)
    model, image_tokens = MODELS[request.param]()
    with torch.no_grad():  # the default init gives near-uniform attention, where top-k changes little
        for name, p in model.named_parameters():
            if any(s in name for s in ("q_proj", "k_proj", "qkv")):
                p.mul_(4.0)
    return request.param, model.eval(), image_tokens


def text_batch():
    ids = torch.randint(3, 290, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def image_batch(image_tokens):
    g = torch.Generator().manual_seed(2)
    ids = torch.cat([torch.full((1, image_tokens), IMAGE_TOKEN), torch.randint(3, 290, (1, 6), generator=g)], 1)
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, 16, 16, generator=g)}


def run(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def text_layers(model):
    return model.model.language_model.layers


def test_the_language_models_layers_come_first(vlm):
    _, model, _ = vlm
    layers = describe_layers(model)
    n = len(text_layers(model))
    assert [info.layer for info in layers] == list(range(n))
    assert all(".language_model.layers." in info.block and info.tower is None for info in layers)
    assert [info.layer for info in layers.towers] == list(range(n, n + len(layers.towers))) and layers.towers
    assert all(info.tower is not None and info.tower in info.block for info in layers.towers)
    table = str(layers)
    assert "layer 0   model.language_model.layers.0" in table and "exact unless named" in table


def test_a_layer_number_switches_that_text_layer(vlm):
    _, model, _ = vlm
    batch = text_batch()
    ref = run(model, batch)
    attn = {i: layer.self_attn for i, layer in enumerate(text_layers(model))}
    with use_topk(model, attn_k={0: 2}):
        assert attention_handler(attn[0], ATTN_IMPLEMENTATION) is not None
        switched = [m for m in model.modules() if attention_handler(m, ATTN_IMPLEMENTATION) is not None]
        assert switched == [attn[0]]
        out = run(model, batch)
    assert (out - ref).abs().max() > 1e-4
    with use_topk(model, attn_k=64):
        assert (run(model, batch) - ref).abs().max() < 1e-5


def test_an_int_ff_k_switches_the_language_models_mlps(vlm):
    _, model, _ = vlm
    batch = text_batch()
    ref = run(model, batch)
    with use_topk(model, ff_k=64):  # = d_ff: exact
        assert (run(model, batch) - ref).abs().max() < 1e-5
    with use_topk(model, ff_k=2):
        patched = [m for m in model.modules() if "forward" in m.__dict__]
        assert patched == [layer.mlp for layer in text_layers(model)]
        assert (run(model, batch) - ref).abs().max() > 1e-4


def _tower_output(model, batch, **topk):
    tower = model.model.vision_tower
    seen = []
    handle = tower.register_forward_hook(lambda m, args, out: seen.append(out.last_hidden_state.clone()))
    try:
        with use_topk(model, **topk):
            logits = run(model, batch)
    finally:
        handle.remove()
    return seen[0], logits


@pytest.mark.parametrize("name", ["gemma3", "llava"])
def test_the_vision_tower_stays_exact_unless_named(name):
    torch.manual_seed(0)
    model, image_tokens = MODELS[name]()
    model.eval()
    batch = image_batch(image_tokens)
    vanilla, ref = _tower_output(model, batch)
    same, logits = _tower_output(model, batch, attn_k=1, ff_k=1)
    assert torch.equal(same, vanilla)  # the tower ran untouched
    assert (logits - ref).abs().max() > 1e-4  # while the language model did not
    first_tower_layer = describe_layers(model).towers[0].layer
    changed, _ = _tower_output(model, batch, attn_k={first_tower_layer: 1})
    assert (changed - vanilla).abs().max() > 1e-5


def test_dual_encoders_keep_the_plain_numbering():
    cfg = T.CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=50, max_position_embeddings=16),
                       vision_config=dict(VISION, num_hidden_layers=1), projection_dim=8)
    layers = describe_layers(T.CLIPModel(cfg))
    assert len(layers) == 2 and layers.towers == [] and all(info.tower is None for info in layers)
