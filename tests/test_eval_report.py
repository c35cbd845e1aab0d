"""Evaluation report (markdown / JSON / plots) and the bench report, on small fake inputs."""

import json

import pytest

import glass_kernels.evaluation.adaptive_report as A

from glass_kernels.evaluation import bench_report as BR
from glass_kernels.evaluation import report as REP


def _row(method, keep, kl, ppl, top1, lam=None, stats=None, name=None):
    return {"kl": kl, "kl_sem": 0.1, "ppl": ppl, "top1": top1, "tokens": 100, "sequences": 4, "method": method,
            "keep": keep, "lam": lam, "stats": stats, "name": name or method}


def fake_results():
    res = {"model": "fake", "chat_template": True, "settings": {"gen_tokens": 64, "length_gen_tokens": 32},
           "machine": {"cpu": "x", "torch_threads": 1, "torch": "t", "glass_ext": True, "glass_isa": "avx2"},
           "stats": {"nps": {"num_sequences": 4, "seq_len": 8, "num_tokens": 32},
                     "text": {"text": "pydoc", "num_tokens": 32}},
           "lam_used": {"a-glass": 0.75, "i-glass": 0.5, "chosen_by": "tune-split sweep"}}
    results = {"dense": _row("dense", 1.0, 0.0, 3.0, 1.0)}
    for keep, f in ((0.5, 1.0), (0.3, 2.0)):
        results[f"griffin@{keep}"] = _row("griffin", keep, 2.0 * f, 30, 0.4)
        results[f"a-glass lam=0.75@{keep}"] = _row("a-glass", keep, 1.5 * f, 20, 0.5, 0.75, "nps", "a-glass lam=0.75")
        results[f"i-glass lam=0.5@{keep}"] = _row("i-glass", keep, 2.5 * f, 40, 0.3, 0.5, "nps", "i-glass lam=0.5")
        results[f"global@{keep}"] = _row("global", keep, 1.8 * f, 25, 0.45, None, "nps")
        results[f"a-glass lam=0.75 (text)@{keep}"] = _row("a-glass", keep, 1.6 * f, 22, 0.5, 0.75, "text",
                                                          "a-glass lam=0.75 (text)")
    res["heldout"] = {"prompts": ["a", "b"], "prompt_tokens_mean": 30.0, "results": results,
                      "jaccard": {"0.5": {"local": [0.4, 0.5], "global": [0.45, 0.4], "aggregated (A)": [0.5, 0.55]}}}
    sw = {"dense": _row("dense", 1.0, 0.0, 3.0, 1.0)}
    for m in ("a-glass", "i-glass"):
        for lam, kl in ((0.0, 2.0), (0.5, 1.5), (1.0, 1.8)):
            sw[f"{m}{lam}"] = _row(m, 0.5, kl, 10, 0.5, lam, "nps", f"{m} lam={lam:g}")
    res["lambda_sweep"] = {"prompts": ["t1"], "results": sw, "best_lam": {"a-glass": 0.5, "i-glass": 0.5}}
    res["prompt_length"] = {"prompts": ["t1"], "keep": 0.5, "rows": [
        {"context_tokens": c, "prompt_tokens_mean": 30 + c, "best_lam": b,
         "by_lam": {"0": _row("a-glass", 0.5, g, 9, 0.5, 0.0), "0.5": _row("a-glass", 0.5, a, 9, 0.5, 0.5)},
         "dense": _row("dense", 1.0, 0, 3, 1)} for c, g, a, b in ((0, 2.0, 1.5, 0.5), (64, 1.2, 1.3, 0.0))]}
    res["timing"] = {"total_s": 1.0}
    return res


def test_eval_report_files_and_content(tmp_path):
    res = fake_results()
    paths = REP.write_report(res, tmp_path, "python -m glass_kernels eval --quick")
    names = {p.name for p in paths}
    assert {"results.json", "report.md", "quality_vs_keep.png", "jaccard_layers.png", "kl_vs_lambda.png",
            "prompt_length.png"} <= names
    for p in paths:
        assert p.stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["heldout"]["results"]["griffin@0.5"]["kl"] == 2.0
    md = (tmp_path / "report.md").read_text()
    assert "python -m glass_kernels eval --quick" in md
    assert "Machine: " in md and "the newest run" not in md  # one run: its machine and statistics
    merged = REP.markdown_report(res | {"runs": [{"parts": ["heldout"]}, {"parts": ["adaptive"]}]})
    assert "Machine of the newest run (each run's in the list below): " in merged and "the newest run's)" in merged
    # A-GLASS 1.5 vs GRIFFIN 2.0: -25.0%; I-GLASS 2.5: +25.0% and "does NOT beat"
    assert "A-GLASS beats GRIFFIN (KL -25.0%" in md
    assert "I-GLASS does NOT beat GRIFFIN (KL +25.0%" in md
    # global 1.8 vs A-GLASS 1.5, s.e. 0.1 each: 0.3 > 2 * 0.141, supported
    assert "aggregation adds over the global prior" in md
    assert "| a-glass lam=0.75 | 1.500 ± 0.100 | -25.0% | 20.00 | 0.500 |" in md
    assert "in 2 of 2 layers" in md  # aggregated >= local and global in both fake layers
    assert "Best lambda (lowest tune KL): A-GLASS 0.5" in md
    # prompt length: best lambda's KL against GRIFFIN's (lambda 0) per context size
    assert "| +0 | 30 | 2.000 | 1.500 | 0.5 | -25.0% |" in md
    assert "| +64 | 94 | 1.200 | 1.300 | 0 | +0.0% |" in md


def test_eval_report_partial_results(tmp_path):
    res = fake_results()
    del res["heldout"], res["prompt_length"]
    REP.write_report(res, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "lambda sweep" in md and "Held-out" not in md


def _bench(name, kind, model, keep, median, **extra):
    return {"name": name, "fullname": f"benchmarks/test_e2e.py::{name}", "group": None,
            "stats": {"median": median, "iqr": 0.0, "rounds": 3},
            "extra_info": dict(kind=kind, model=model, keep=keep, threads=2, **extra)}


def fake_bench(scale=1.0):
    return {"datetime": "2026-01-01T00:00:00", "machine_info": {"cpu": {"brand_raw": "cpu"}}, "benchmarks": [
        _bench("test_mlp_share[m]", "mlp_share", "m", 1.0, 0.1, mlp_share=0.6),
        _bench("test_decode[m-dense]", "decode", "m", 1.0, 1.0 * scale, tokens_per_s=32.0, method="dense"),
        _bench("test_decode[m-keep0.5]", "decode", "m", 0.5, 0.8 * scale, tokens_per_s=40.0, method="a-glass"),
        _bench("test_ttft[m-dense]", "ttft", "m", 1.0, 0.05, prompt_tokens=20, method="dense"),
        _bench("test_ttft[m-keep0.5]", "ttft", "m", 0.5, 0.06, prompt_tokens=20, method="a-glass"),
        {"name": "test_kernel[x]", "stats": {"median": 0.001}, "extra_info": {"impl": "sparse_ffn"}},
    ]}


def test_bench_rows_speedup_and_amdahl():
    rows = BR.e2e_rows(fake_bench())
    r = rows["m"]["decode"][0.5]
    assert r["speedup"] == pytest.approx(1.25)
    assert r["amdahl_ceiling"] == pytest.approx(1 / (0.4 + 0.3))  # f = 0.6, keep 0.5
    md = BR.markdown(fake_bench())
    assert "| 0.5 | a-glass | 2 | 40.0 | 1.25x | 1.43x | 2.00x |" in md
    assert "+10.0 ms selection" in md
    assert "test_kernel[x]" in md


def test_a_patched_keep_one_case_is_its_own_row_not_the_dense_one():
    doc = fake_bench()
    doc["benchmarks"].insert(2, _bench("test_decode[m-keep1]", "decode", "m", 1.0, 0.9, tokens_per_s=35.0,
                                       method="a-glass", dense_paired_median_s=0.99, decode_steps=64,
                                       sparse_decode_steps=64))
    rows = BR.e2e_rows(doc)["m"]
    assert rows["dense"]["decode"]["tokens_per_s"] == 32.0  # the unpatched case survives
    assert rows["decode"][1.0]["speedup"] == pytest.approx(1.1)  # 0.99 / 0.9, paired
    assert rows["decode"][0.5]["speedup"] == pytest.approx(1.25)  # 1.0 / 0.8: against the dense case
    md = BR.markdown(doc)
    assert "| dense | dense | 2 | 32.0 | 1.00x | - | - | - |" in md
    assert "| 1 | a-glass | 2 | 35.0 | 1.10x | 1.00x | 1.00x | 64 of 64 |" in md
    assert BR.sparse_step_lines(doc) == ["m keep 1: 1.10x of dense, 64 of 64 decode steps ran sparse"]


@pytest.mark.parametrize("layers, note", [
    ([0, 30], " (every layer keeps all its neurons: each ran its dense forward)"),
    ([12, 30], " (the kernel in 12 of 30 layers; the others keep all their neurons)"),
    ([30, 30], ""),
    (None, ""),  # runs recorded before the layer count
])
def test_sparse_steps_say_where_layers_ran_dense(layers, note):
    doc = fake_bench()
    doc["benchmarks"].insert(2, _bench("test_decode[m-keep1]", "decode", "m", 1.0, 0.9, tokens_per_s=35.0,
                                       method="a-glass", dense_paired_median_s=0.99, decode_steps=64,
                                       sparse_decode_steps=64, kernel_layers=layers))
    assert BR.sparse_step_lines(doc)[0] == f"m keep 1: 1.10x of dense, 64 of 64 decode steps ran sparse{note}"
    assert f"| 64 of 64{note} |" in BR.markdown(doc)


def test_bench_report_history_and_compare(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(fake_bench(1.0)))
    b.write_text(json.dumps(fake_bench(2.0)))
    out = tmp_path / "rep"
    BR.write_bench_report(a, out, stamp="20260101T000000Z")
    with pytest.raises(FileNotFoundError, match="no earlier run"):
        BR.write_bench_report(a, tmp_path / "empty", compare="last")
    paths = BR.write_bench_report(b, out, compare="last", stamp="20260101T000100Z")
    assert (out / "history" / "20260101T000000Z.json").exists()
    assert (out / "history" / "20260101T000100Z.json").exists()
    assert any(p.name == "speedup_vs_keep.png" for p in paths)
    md = (out / "report.md").read_text()
    assert "Compared with" in md and "| test_decode[m-dense] | 1000.000 | 2000.000 | 2.000 |" in md


def test_bench_rejects_non_benchmark_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{}")
    with pytest.raises(ValueError, match="pytest-benchmark"):
        BR.load_bench(p)


def test_eval_report_lists_only_the_plots_it_wrote(tmp_path):
    res = fake_results()
    del res["prompt_length"], res["lambda_sweep"]
    paths = REP.write_report(res, tmp_path)
    written = sorted(p.name for p in paths if p.suffix == ".png")
    assert written == ["jaccard_layers.png", "quality_vs_keep.png"]
    md = (tmp_path / "report.md").read_text()
    assert "Plots: quality_vs_keep.png, jaccard_layers.png. Every number" in md


def test_bench_report_warns_on_competing_load_not_on_its_own_threads():
    quiet = fake_bench()
    for b in quiet["benchmarks"][:5]:
        b["extra_info"].update(other_load_cores=0.02, loadavg_1m=2.1, cores=2)  # own threads: load ~2
    md = BR.markdown(quiet)
    assert "Other processes used 0.02 cores" in md and "Warning" not in md
    busy = fake_bench()
    busy["benchmarks"][1]["extra_info"].update(other_load_cores=0.9)
    assert "Warning: other processes competed with this run (up to 0.90 cores)" in BR.markdown(busy)
    old = fake_bench()  # history from before other_load_cores: the load-average rule still applies
    old["benchmarks"][0]["extra_info"].update(loadavg_1m=3.0, cores=2)
    assert "oversubscribed" in BR.markdown(old)


def test_bench_speedup_uses_the_paired_dense_runs_when_recorded():
    doc = fake_bench()
    doc["benchmarks"][2]["extra_info"]["dense_paired_median_s"] = 1.2  # dense drifted slower during this case
    r = BR.e2e_rows(doc)["m"]["decode"][0.5]
    assert r["speedup"] == pytest.approx(1.5)  # 1.2 / 0.8, not the dense row's 1.0 / 0.8


def test_reports_without_matplotlib_write_tables_and_say_so(tmp_path, monkeypatch, caplog):
    """`pip install glass_kernels[hf]` has no matplotlib: eval and bench still write their tables."""
    monkeypatch.setattr(REP, "plotting_available", lambda: False)
    res = fake_results()
    with caplog.at_level("WARNING"):
        paths = REP.write_report(res, tmp_path)
    assert [p.suffix for p in paths] == [".json", ".md"]
    assert any("matplotlib is not installed" in r.getMessage() for r in caplog.records)


def test_eval_report_quantized_rows_table_and_plot(tmp_path):
    res = fake_results()
    q = {"dense": _row("dense", 1.0, 0.0, 3.0, 1.0)}
    for w, kl in (("int8", 0.01), ("int4", 0.2)):
        q[f"dense [{w}]@1"] = dict(_row("dense", 1.0, kl, 3.1, 0.9, name=f"dense [{w}]"), weights=w)
        q[f"a-glass [{w}]@0.5"] = dict(_row("a-glass", 0.5, 1.0 + kl, 9, 0.5, 0.75, "nps", f"a-glass [{w}]"),
                                       weights=w)
    res["quant"] = {"prompts": ["a", "b"], "results": q}
    paths = REP.write_report(res, tmp_path)
    assert "quantized_rows.png" in {p.name for p in paths}
    md = (tmp_path / "report.md").read_text()
    # FFN bytes per decode step vs fp32 dense: Q8_0 34/128 per value, Q4_0 18/128, times keep
    assert "| dense [int8] | int8 | 1 | 0.266 | 0.010 ± 0.100 |" in md
    assert "| a-glass [int4] | int4 | 0.5 | 0.070 | 1.200 ± 0.100 |" in md
    assert "quantized_rows.png" in md


def test_bench_report_names_quantized_weights_and_their_ceiling():
    doc = fake_bench()
    doc["benchmarks"][2]["extra_info"].update(weights="int8", amdahl_ceiling_bytes=2.1)
    md = BR.markdown(doc)
    assert "| 0.5 | a-glass [int8] | 2 | 40.0 | 1.25x | 1.43x |" in md
    assert "keep 0.5 2.10x" in md
    assert "| 0.5 | a-glass | 2 |" not in md


def test_verdict_claims_only_what_the_standard_errors_support():
    res = fake_results()
    r = res["heldout"]["results"]
    r["global@0.5"]["kl"] = 1.6  # 0.1 from A-GLASS's 1.5 with s.e. 0.1 each: not supported
    r["i-glass lam=0.5@0.5"]["kl"] = 2.1  # 0.1 above GRIFFIN's 2.0: within the errors
    v = REP.verdict(res["heldout"], 0.5)
    assert "A-GLASS beats GRIFFIN" in v
    assert "I-GLASS is within the standard errors of GRIFFIN" in v
    assert "no evidence that aggregation adds over the global prior" in v


def _adaptive(gain):
    """Fake adaptive-study results: every option's KL per bucket; layer+keep ``gain`` below lam=0.5."""
    from glass_kernels.evaluation.adaptive_study import study_options, summarize

    options = study_options()
    base = {"griffin": 2.0, "lam=0.25": 1.6, "lam=0.5": 1.5, "lam=0.75": 1.55, "lam=1": 1.7, "length": 1.45,
            "layer": 1.44, "length+keep": 1.4, "layer+keep": 1.5 * (1 - gain), "length+keep-unrefined": 1.42,
            "length+keep-all": 1.46}
    rows = [{"variant": "template", "context_tokens": c, "prompt_tokens_mean": 40 + c,
             "results": {f"{o.name}@0.5": {"kl": base[o.name] * f, "kl_sem": 0.01} for o in options}}
            for c, f in ((0, 1.0), (64, 0.8))]
    src = {"fit": {"tau": 128.0, "layer_tau": [100.0, 200.0], "keep_shrink": 0.25,
                   "meta": {"seconds": 1.0, "keep_shrink_kl": {"0": 1.3, "0.25": 1.2, "1": 1.4},
                            "refine": {"0.5": {"kl_fitted": 1.2, "kl_refined": 1.1, "moves": [[0, 1]],
                                               "applied": True}}}}, "stats": {},
           "rows": rows, "bytes_per_token": {f"{o.name}@0.5": 2 ** 20 for o in options}}
    src["summary"] = summarize(src, options, [0.5])
    return {"buckets": [0, 64], "keeps": [0.5], "gen_tokens": 8, "variants": ["template"], "tune_prompts": 2,
            "heldout_prompts": 2, "sources": {"nps": src}}


def test_adaptive_section_table_verdict_and_plot(tmp_path):
    res = fake_results()
    res["adaptive"] = _adaptive(0.2)
    paths = REP.write_report(res, tmp_path)
    assert "adaptive_length.png" in {p.name for p in paths}
    md = (tmp_path / "report.md").read_text()
    assert "## Adaptive selection" in md
    # lam=0.5 is the best single lambda (1.5 and 1.2 over the buckets); layer+keep is 20% below in both
    assert "| lam=0.5 (best single) | 1.500 | 1.200 | 1.350 | +0.0% |" in md
    assert "best new option layer+keep: -20.0% mean KL vs the best single lambda (lam=0.5)" in md
    assert "meets the bar" in md
    assert "share 0.25 of the reallocation (tune KL by share: 0 1.3000, 0.25 1.2000, 1 1.4000)" in md
    assert "Joint-context refinement: keep 0.5: KL 1.2000 -> 1.1000 by 1 moves (sensitivity prompts)" in md
    assert "Resumed" not in md
    assert "refined with every layer sparse" in md  # this fit has a refinement
    del res["adaptive"]["sources"]["nps"]["fit"]["meta"]["refine"]
    assert "share of the reallocation; +keep-all: all of it" in "\n".join(A.adaptive_markdown(res["adaptive"]))
    res["adaptive"]["sources"]["nps"] |= {"resumed": {"checkpoint": "x", "rows": 1}, "seconds": 12.5}
    REP.write_report(res, tmp_path)
    assert ("Resumed: the fit and 1 of the scored rows below come from a stopped run of the same code, inputs "
            "and machine (12.5 s of computing over all runs)") in (tmp_path / "report.md").read_text()
    s = _adaptive(0.05)["sources"]["nps"]["summary"]["template@0.5"]
    from glass_kernels.evaluation.adaptive_report import adaptive_verdict

    assert "does not meet the bar" in adaptive_verdict(s)  # length+keep at -6.7%: short of -10%
