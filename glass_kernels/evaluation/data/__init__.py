"""The evaluation's data: the prompt set (prompts.json) and the "text" calibration corpus.

Nothing here downloads anything: the prompts were written for this project, and the text corpus
is the English documentation that ships with CPython itself (``pydoc_data.topics``).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["PROMPTS_FILE", "load_prompts", "text_corpus", "SPLITS", "KINDS"]

PROMPTS_FILE = Path(__file__).with_name("prompts.json")
SPLITS = ("tune", "heldout")
KINDS = ("instruction", "question", "story", "code", "list", "dialogue")


def load_prompts(split: str | None = None, path: str | Path | None = None) -> list[dict]:
    """The prompts (dicts with id, kind, split, text), optionally only one split, in file order."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    p = Path(path) if path is not None else PROMPTS_FILE
    with open(p, encoding="utf-8") as f:
        doc = json.load(f)
    items = doc["prompts"]
    for it in items:
        if it.get("split") not in SPLITS or not isinstance(it.get("text"), str) or not it["text"]:
            raise ValueError(f"{p}: malformed prompt entry {it!r}")
    return [it for it in items if split is None or it["split"] == split]


def text_corpus(min_chars: int = 400) -> list[str]:
    """Documents for the "text" global statistics: the topics of Python's bundled pydoc help.

    Each topic (e.g. "if", "class", "atom-identifiers") is one document of English prose mixed
    with grammar snippets; topics shorter than ``min_chars`` are dropped (mostly cross-reference
    stubs). Sorted by topic name so the corpus (and the chunks calibrate() makes) is reproducible.
    """
    from pydoc_data import topics

    docs = [topics.topics[k] for k in sorted(topics.topics)]
    return [d for d in docs if len(d) >= min_chars]
