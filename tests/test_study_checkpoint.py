"""A stopped adaptive-selection study goes on from its last saved piece (evaluation/checkpoint.py):
the same results as an uninterrupted run, nothing redone, a fresh start when anything that decides
the results differs, and a clear error for a damaged checkpoint."""

import dataclasses
import json

import pytest

from glass_kernels.evaluation import adaptive_study as S
from glass_kernels.evaluation import run as R
from glass_kernels.evaluation.checkpoint import StudyCheckpoint
from glass_kernels.stats import StatsFileError
from tiny_models import VOCAB, build, random_stats

pytest.importorskip("transformers")


class _WordTok:
    """Plain text, one token per word (ids in the tiny model's vocabulary); no chat template."""

    pad_token_id = 0
    chat_template = None

    def __call__(self, text):
        return {"input_ids": [3 + sum(map(ord, w)) % (VOCAB - 3) for w in text.split()][:40] or [3]}


SETTINGS = dataclasses.replace(R.EvalSettings.quick(), adaptive_tune=2, adaptive_heldout=2,
                               adaptive_targets=(0, 12), adaptive_gen_tokens=4, batch_size=2, progress=False)


@pytest.fixture(scope="module")
def model():
    return build("llama", seed=5)


def _study(model, stats, root, *, settings=SETTINGS, gen=None, fit=None, monkeypatch=None):
    tok = _WordTok()
    fingerprint = "tiny-llama"

    def real_gen(ids, n, desc):
        return R.dense_continuations(model, tok, ids, n, cache_file=None, fingerprint=fingerprint,
                                     batch_size=settings.batch_size)

    if fit is not None:
        monkeypatch.setattr("glass_kernels.adaptive.fit_selection", fit)
    return S.run_study(model, tok, "tiny", settings, {"nps": stats}, gen=gen or real_gen, cache_file=None,
                       fingerprint=fingerprint, progress_cls=lambda total, desc: R._Progress(total, desc, False),
                       log=lambda msg: None, checkpoint_root=root)


def _rows(res):
    return [(r["variant"], r["context_tokens"], r["results"]) for r in res["sources"]["nps"]["rows"]]


def _never(*args, **kwargs):
    raise AssertionError("a saved piece was made again")


def test_a_stopped_study_goes_on_and_gives_the_same_results(model, tmp_path, monkeypatch):
    stats = random_stats(model, seed=2)
    whole = _study(model, stats, tmp_path / "a")
    assert len(whole["sources"]["nps"]["rows"]) == 2 and "resumed" not in whole["sources"]["nps"]

    # everything saved: neither the fit nor any row is made again
    again = _study(model, stats, tmp_path / "a", gen=_never, fit=_never, monkeypatch=monkeypatch)
    assert _rows(again) == _rows(whole)
    assert again["sources"]["nps"]["fit"] == whole["sources"]["nps"]["fit"]
    assert again["sources"]["nps"]["resumed"]["rows"] == 2
    assert again["sources"]["nps"]["summary"] == whole["sources"]["nps"]["summary"]
    monkeypatch.undo()

    # stopped after the fit and the first bucket: only the second bucket is scored again, to the same numbers
    (folder,) = (tmp_path / "a").iterdir()
    progress = json.loads((folder / "progress.json").read_text())
    progress["rows"] = progress["rows"][:1]
    (folder / "progress.json").write_text(json.dumps(progress))
    scored = []

    def gen(ids, n, desc):
        scored.append(desc)
        return R.dense_continuations(model, _WordTok(), ids, n, cache_file=None, fingerprint="tiny-llama",
                                     batch_size=SETTINGS.batch_size)

    resumed = _study(model, stats, tmp_path / "a", gen=gen, fit=_never, monkeypatch=monkeypatch)
    assert scored == ["adaptive-nps-template-12"]
    assert _rows(resumed) == _rows(whole)
    assert resumed["sources"]["nps"]["resumed"]["rows"] == 1
    assert len(json.loads((folder / "progress.json").read_text())["rows"]) == 2


def test_other_statistics_or_settings_start_afresh(model, tmp_path):
    stats = random_stats(model, seed=2)
    key = S._checkpoint_key("fp", "nps", stats, SETTINGS)
    assert S._checkpoint_key("fp", "nps", random_stats(model, seed=3), SETTINGS)["stats"] != key["stats"]
    other = dataclasses.replace(SETTINGS, adaptive_gen_tokens=5)
    folders = {StudyCheckpoint(tmp_path, "m", k).path
               for k in (key, S._checkpoint_key("fp", "nps", stats, other), S._checkpoint_key("fp2", "nps", stats, SETTINGS),
                         S._checkpoint_key("fp", "nps", stats, SETTINGS))}
    assert len(folders) == 3  # the last key is the first one again: its folder


def test_a_damaged_checkpoint_is_named(model, tmp_path):
    ckpt = StudyCheckpoint(tmp_path, "m", {"k": 1})
    (ckpt.path / "progress.json").write_text("{not json")
    with pytest.raises(ValueError, match="progress.json"):
        StudyCheckpoint(tmp_path, "m", {"k": 1})
    (ckpt.path / "progress.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a study checkpoint"):
        StudyCheckpoint(tmp_path, "m", {"k": 1})
    (ckpt.path / "progress.json").unlink()
    (ckpt.path / "fit.safetensors").write_bytes(b"garbage")
    with pytest.raises(StatsFileError, match="fit.safetensors"):
        StudyCheckpoint(tmp_path, "m", {"k": 1}).load_fit(model)
