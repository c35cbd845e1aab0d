"""python -m glass_kernels: argument parsing, and demo / generate / calibrate end to end on a tiny
random model injected through main(loader=...)."""

import io
import re
import subprocess
import sys

import argparse

import pytest
import torch

import tiny_models
from glass_kernels import cli
from glass_kernels.stats import GlobalStats


class Tok:
    """Character tokenizer for the tiny models (BOS 1, EOS 2, pad 0), with what the CLI uses."""

    bos_token_id, eos_token_id, pad_token_id = 1, 2, 0
    chat_template = None

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = ([1] if add_special_tokens else []) + [3 + (ord(c) % (tiny_models.VOCAB - 3)) for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(97 + (int(i) % 26)) for i in ids)


def loader_for(family="llama"):
    calls = []

    def load(name, dtype):
        calls.append((name, dtype))
        return tiny_models.build(family, dtype=dtype), Tok()

    load.calls = calls
    return load


@pytest.fixture(autouse=True)
def _cache(monkeypatch, tmp_path):
    monkeypatch.setenv("GLASS_KERNELS_CACHE", str(tmp_path / "cache"))
    yield
    torch.set_num_threads(torch.get_num_threads())


def run(argv, loader=None):
    out = io.StringIO()
    rc = cli.main(argv, loader=loader or loader_for(), out=out)
    return rc, out.getvalue()


# ---- parsing --------------------------------------------------------------------------------

def test_parser_defaults_and_options():
    p = cli.build_parser(["demo"])
    a = p.parse_args(["demo"])
    assert (a.model, a.keep, a.method, a.lam, a.max_new_tokens, a.threads, a.prompt, a.dtype) == (
        "smollm2", 0.5, None, None, 64, None, None, "float32")
    a = p.parse_args(["demo", "--keep", "0.7", "--method", "griffin", "--lam", "0.3", "--threads", "2",
                      "--prompt", "a", "--prompt", "b", "--max-new-tokens", "9", "--model", "gemma3-270m"])
    assert (a.keep, a.method, a.lam, a.threads, a.prompt, a.max_new_tokens, a.model) == (
        0.7, "griffin", 0.3, 2, ["a", "b"], 9, "gemma3-270m")
    a = p.parse_args(["generate", "hi", "--method", "dense"])
    assert a.prompt == "hi" and a.method == "dense" and a.max_new_tokens == 128
    a = p.parse_args(["calibrate", "--source", "x.txt", "--num-sequences", "8", "--seq-len", "32", "-o", "s.st"])
    assert (a.source, a.num_sequences, a.seq_len, a.output, a.nps_prompt) == ("x.txt", 8, 32, "s.st", "bos")


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--keep", "0"],
        ["demo", "--keep", "1.5"],
        ["demo", "--lam", "-0.1"],
        ["demo", "--method", "nope"],
        ["demo", "--threads", "0"],
        ["demo", "--max-new-tokens", "0"],
        ["generate"],
        ["calibrate", "--seq-len", "-3"],
        [],
        ["frobnicate"],
    ],
)
def test_parser_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser(argv[:1]).parse_args(argv)
    assert e.value.code == 2


def test_eval_bench_are_wired_lazily(capsys):
    p = cli.build_parser(["demo"])
    assert p.parse_args(["eval"]).command == "eval"  # listed without importing the evaluation package
    try:
        import glass_kernels.evaluation.cli as ecli  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit):
            cli.main(["eval"])
        assert "glass_kernels.evaluation.cli" in capsys.readouterr().err


# ---- end to end on a tiny model ---------------------------------------------------------------

DEMO = ["demo", "--model", "tiny", "--max-new-tokens", "6", "--repeats", "1", "--no-progress",
        "--prompt", "hello there", "--prompt", "abc", "--calib-sequences", "4", "--calib-seq-len", "16"]


def _table(out):
    rows = {}
    for line in out.splitlines():
        m = re.match(r"^(dense|\S+ keep=[\d.]+)\s+([\d.]+)\s+([\d.]+)-([\d.]+)\s+([\d.]+)x\s+([\d.]+)%\s+"
                     r"([\d.]+)\s+(-|\d+/\d+)$", line)
        if m:
            tps, lo, hi = (float(m.group(i)) for i in (2, 3, 4))
            assert lo <= tps <= hi, line  # the median lies within the spread of the runs
            rows[m.group(1)] = (tps,) + tuple(float(x) for x in m.groups()[4:7]) + (m.group(8),)
    return rows


def test_demo_end_to_end_and_stats_cache(tmp_path):
    load = loader_for()
    rc, out = run(DEMO + ["--threads", "1"], load)
    assert rc == 0 and load.calls == [("tiny", torch.float32)]
    assert "machine:" in out and "1 threads" in out and "calibrating" in out
    assert out.count(">>> ") == 2 and "dense" in out and "GLASS a-glass keep=0.5" in out
    rows = _table(out)
    assert set(rows) == {"dense", "a-glass keep=0.8", "a-glass keep=0.7", "a-glass keep=0.5"}, out
    assert rows["dense"][1] == 1.0 and rows["dense"][2] == 100.0 and rows["dense"][4] == "-"
    for k, (tps, speedup, agree, prefix, steps) in rows.items():
        assert tps > 0 and 0 <= agree <= 100 and 0 <= prefix <= 6
        if k != "dense":  # 2 prompts x 1 round, 6 new tokens: 5 decode steps each, all sparse
            assert steps == "10/10", (k, out)
    assert "WARNING" not in out
    cached = list((tmp_path / "cache" / "stats").glob("tiny-*-nps4x16-bos-seed0.safetensors"))
    assert len(cached) == 1
    # second run reuses the statistics
    rc, out2 = run(DEMO, loader_for())
    assert rc == 0 and "cached" in out2 and "calibrating" not in out2


def test_demo_keep_one_agrees_with_dense():
    """keep = 1.0 keeps every neuron: the patched model must reproduce the dense tokens exactly."""
    rc, out = run(DEMO + ["--keep", "1.0", "--method", "griffin"])
    rows = _table(out)
    assert rows["griffin keep=1"][2] == 100.0 and rows["griffin keep=1"][3] == 6.0, out


def test_generate_dense_and_patched(tmp_path, capsys):
    rc, dense = run(["generate", "hello", "--model", "tiny", "--method", "dense", "--max-new-tokens", "5"])
    assert rc == 0 and len(dense.strip()) == 5
    rc, full = run(["generate", "hello", "--model", "tiny", "--method", "griffin", "--keep", "1.0",
                    "--max-new-tokens", "5"])
    assert full == dense  # keep 1.0 == dense greedy
    rc, half = run(["generate", "hello", "--model", "tiny", "--method", "a-glass", "--keep", "0.5",
                    "--max-new-tokens", "5", "--no-progress"])
    assert rc == 0 and len(half.strip()) == 5
    rc, s1 = run(["generate", "hello", "--model", "tiny", "--method", "dense", "--do-sample", "--seed", "3",
                  "--max-new-tokens", "8"])
    rc, s2 = run(["generate", "hello", "--model", "tiny", "--method", "dense", "--do-sample", "--seed", "3",
                  "--max-new-tokens", "8"])
    assert s1 == s2
    err = capsys.readouterr().err
    assert "decode" in err
    assert "4 of 4 decode steps ran sparse" in err  # the a-glass run: 5 new tokens, 4 decode steps


def test_calibrate_writes_loadable_stats(tmp_path):
    outp = tmp_path / "s.safetensors"
    rc, out = run(["calibrate", "--model", "tiny", "--num-sequences", "3", "--seq-len", "12", "--batch-size", "2",
                   "-o", str(outp), "--no-progress"])
    assert rc == 0 and str(outp) in out
    model = tiny_models.build("llama")
    s = GlobalStats.load(outp, model=model)
    assert s.meta["source"] == "nps" and s.meta["num_sequences"] == 3 and s.meta["seq_len"] == 12
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text to calibrate on. " * 10)
    rc, out = run(["calibrate", "--model", "tiny", "--source", str(corpus), "--seq-len", "16", "--no-progress"])
    assert rc == 0 and "-text" in out
    # stats from the text source are usable by generate --stats
    path = out.strip().split("-> ")[-1]
    rc, g = run(["generate", "hi", "--model", "tiny", "--stats", path, "--max-new-tokens", "3"])
    assert rc == 0 and len(g.strip()) == 3


def test_calibrate_fit_then_generate_adaptive(tmp_path):
    outp = tmp_path / "s.safetensors"
    prompts = tmp_path / "p.txt"
    prompts.write_text("tell me about the sea\nwrite a short poem\n\nlist three colours\n")
    rc, out = run(["calibrate", "--model", "tiny", "--num-sequences", "3", "--seq-len", "12", "--batch-size", "2",
                   "-o", str(outp), "--no-progress", "--fit", "--fit-prompts", str(prompts)])
    assert rc == 0 and "selection fit: tau" in out
    s = GlobalStats.load(outp, model=tiny_models.build("llama"))
    assert s.fit is not None and s.fit.meta["prompts"] == 3 * 4  # three prompts at four lengths
    rc, g = run(["generate", "hi", "--model", "tiny", "--stats", str(outp), "--lam", "layer", "--keep-split",
                 "fitted", "--max-new-tokens", "3"])
    assert rc == 0 and len(g.strip()) == 3
    # a method without global statistics still reads the fit from --stats (not from the cache)
    rc, g = run(["generate", "hi", "--model", "tiny", "--method", "griffin", "--stats", str(outp), "--keep-split",
                 "fitted", "--max-new-tokens", "3"])
    assert rc == 0 and len(g.strip()) == 3
    # refitting an existing file; --stats without --fit is refused
    rc, out = run(["calibrate", "--model", "tiny", "--stats", str(outp), "--fit", "--fit-prompts", str(prompts),
                   "--no-progress"])
    assert rc == 0 and str(outp) in out
    with pytest.raises(SystemExit, match="--fit"):
        run(["calibrate", "--model", "tiny", "--stats", str(outp)])
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(SystemExit, match="no prompt"):
        run(["calibrate", "--model", "tiny", "--stats", str(outp), "--fit", "--fit-prompts", str(empty)])


def test_lam_argument_accepts_the_adaptive_modes():
    from glass_kernels.cli import _lam

    assert _lam("length") == "length" and _lam("0.25") == 0.25
    with pytest.raises(argparse.ArgumentTypeError, match="length"):
        _lam("auto")


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "glass_kernels", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "demo" in r.stdout and "calibrate" in r.stdout


def test_tune_measures_and_prints_every_candidate(tmp_path, monkeypatch):
    from glass_kernels import _ext, tuning

    if not _ext.available():
        pytest.skip("C++ extension not available")
    monkeypatch.setenv("GLASS_KERNELS_CACHE", str(tmp_path))
    C = _ext.require()
    saved = C.get_isa(), C.get_decode_tuning()
    try:
        rc, out = run(["tune", "--model", "tiny", "--threads", "1"])
    finally:
        C.set_isa(saved[0])
        C.set_decode_tuning(*saved[1])
    assert rc == 0 and "chosen:" in out and str(tuning.cache_file()) in out
    # every in-place candidate in both layouts and two compacted-copy reads, per ISA with its own fp32
    # kernel (the default dtype)
    isas = tuning._isa_candidates(lambda: C.kernel_name("float32", True))
    assert sum(line.startswith("  ") for line in out.splitlines()) == (2 * len(tuning.CANDIDATES) + 2) * len(isas)
    assert "/bundled" in out and "rows (measured" in out
