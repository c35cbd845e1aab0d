"""`python -m glass_kernels eval|bench` argument handling (no model is run here)."""

import pytest

from glass_kernels.cli import build_parser
from glass_kernels.evaluation.cli import settings_from_args
from glass_kernels.evaluation.run import EvalSettings, heldout_configs


def _parse(*argv):
    return build_parser([argv[0]]).parse_args(list(argv))


def test_eval_defaults_and_quick():
    s = settings_from_args(_parse("eval"))
    assert s.keeps == (0.5, 0.4, 0.3, 0.2) and s.gen_tokens == 256 and s.lam is None
    q = settings_from_args(_parse("eval", "--quick", "--no-progress"))
    assert q.keeps == (0.5,) and q.gen_tokens < 256 and q.progress is False
    assert q == EvalSettings.quick().__class__(**{**EvalSettings.quick().__dict__, "progress": False})


def test_eval_overrides():
    s = settings_from_args(_parse("eval", "--keeps", "0.5,0.3", "--gen-tokens", "96", "--lam", "0.6",
                                  "--parts", "heldout", "--length-targets", "0,64"))
    assert s.keeps == (0.5, 0.3) and s.gen_tokens == 96 and s.lam == 0.6 and s.parts == ("heldout",)
    assert s.length_targets == (0, 64)


@pytest.mark.parametrize("argv", [("eval", "--keeps", "0"), ("eval", "--keeps", "1.5"), ("eval", "--gen-tokens", "0"),
                                  ("eval", "--sweep-lams", "2")])
def test_eval_bad_arguments_exit(argv):
    with pytest.raises(SystemExit):
        _parse(*argv)


def test_eval_bad_parts_and_lambda():
    with pytest.raises(SystemExit, match="--parts"):
        settings_from_args(_parse("eval", "--parts", "sweep,nope"))
    with pytest.raises(SystemExit, match="--lam"):
        settings_from_args(_parse("eval", "--lam", "1.5"))


def test_heldout_configs_cover_the_methods():
    cs = heldout_configs((0.5, 0.2), 0.75, 0.5)
    names = {c.key for c in cs}
    for keep in ("0.5", "0.2"):
        for n in ("random", "global", "griffin", "a-glass lam=0.75", "i-glass lam=0.5", "a-glass lam=0.75 (text)",
                  "oracle"):
            assert f"{n}@{keep}" in names


def test_bench_arguments():
    a = _parse("bench", "x.json", "--compare", "last")
    assert a.json == "x.json" and a.compare == "last"


def test_merge_results_keeps_other_parts_and_adds_keeps():
    from glass_kernels.evaluation.cli import merge_results

    old = {"model": "m", "lam_used": {"a-glass": 0.5}, "lambda_sweep": {"best_lam": 1},
           "heldout": {"prompts": ["a"], "results": {"griffin@0.5": 1, "dense": 0}, "jaccard": {"0.5": 1}},
           "settings": {"x": 1}, "timing": {"t": 1}}
    new = {"model": "m", "lam_used": {"a-glass": 0.5}, "settings": {"x": 2}, "timing": {"t": 2},
           "heldout": {"prompts": ["a"], "results": {"griffin@0.3": 2, "dense": 0}, "jaccard": {"0.3": 2}}}
    m = merge_results(old, new)
    assert m["lambda_sweep"] == {"best_lam": 1}
    assert set(m["heldout"]["results"]) == {"griffin@0.5", "griffin@0.3", "dense"}
    assert set(m["heldout"]["jaccard"]) == {"0.5", "0.3"}
    assert len(m["runs"]) == 2
    # two runs of the same part keep their own timings
    assert m["timing"] == {"run 1 (lambda_sweep+heldout): t": 1, "run 2 (heldout): t": 2}
    # a sweep-only run does not relabel the held-out lambda
    m2 = merge_results(old, {"lambda_sweep": {"best_lam": 2}, "lam_used": {"a-glass": 0.9}})
    assert m2["lam_used"] == {"a-glass": 0.5} and m2["lambda_sweep"] == {"best_lam": 2}


def test_merge_results_describes_the_newest_run_and_records_each():
    from glass_kernels.evaluation.cli import merge_results
    from glass_kernels.evaluation.report import _run_line

    stats_old = {"nps": {"num_sequences": 16, "seq_len": 128, "num_tokens": 2048}}
    stats_new = {"nps": {"num_sequences": 64, "seq_len": 256, "num_tokens": 14711}}
    old = {"model": "m", "lambda_sweep": {"best_lam": 1}, "stats": stats_old, "machine": {"torch_threads": 1},
           "settings": {"gen_tokens": 96, "n_tune": 6}, "timing": {}}
    new = {"model": "m", "heldout": {"prompts": ["a"], "results": {}}, "stats": stats_new,
           "machine": {"torch_threads": 2}, "command": "python -m glass_kernels eval --parts heldout",
           "settings": {"gen_tokens": 256, "n_heldout": None, "keeps": [0.5]}, "timing": {}}
    m = merge_results(old, new)
    assert m["stats"] == stats_new and m["machine"] == {"torch_threads": 2}
    assert [r["stats"] for r in m["runs"]] == [stats_old, stats_new]
    line = _run_line(m["runs"][1])
    assert "all held-out prompts" in line and "64x256 (14711 tokens)" in line and "256-token" in line
    assert "--parts heldout" in line
    assert "6 tune prompts" in _run_line(m["runs"][0])
    assert "AMD EPYC (avx2)" in _run_line({"parts": ["heldout"], "machine": {"cpu": "AMD EPYC", "glass_isa": "avx2"}})


def test_run_line_describes_a_prompt_length_run_by_its_own_sizes():
    from glass_kernels.evaluation.report import _run_line

    run = {"parts": ["prompt_length"], "settings": {"gen_tokens": 256, "n_length": 12,
                                                    "length_targets": [0, 64], "length_gen_tokens": 128}}
    line = _run_line(run)
    assert "12 tune prompts, +0/64 context tokens, 128-token continuations" in line
    assert "256-token" not in line  # the held-out continuation length does not apply to this run
