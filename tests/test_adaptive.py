"""Adaptive selection (glass_kernels.adaptive): λ by prompt length and layer, per-layer keep under one
budget, the fit, its storage in the statistics file, and the evaluation's one-prompt-pass scoring."""

import dataclasses
import math

import pytest
import torch

import glass_kernels as gk
from glass_kernels import adaptive as A
from glass_kernels.evaluation import run as R
from glass_kernels.stats import StatsFileError, StatsMismatchError, stat_ranks
from tiny_models import build, random_stats

pytest.importorskip("transformers")


class _Tok:
    pad_token_id = 0


def _fit(L=2, tau=16.0, layer_tau=None, loss=None):
    grid = torch.tensor(A.KEEP_GRID, dtype=torch.float64)
    if loss is None:
        loss = torch.stack([(1 - grid) ** 2 * (l + 1) for l in range(L)])
    return A.SelectionFit(tau, layer_tau or [tau * (l + 1) for l in range(L)], grid, loss, {"note": "test"})


def _prompts(lens=(3, 5, 9, 17, 30, 40, 7, 12), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 96, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module")
def model():
    return build("llama", seed=3)


@pytest.fixture(scope="module")
def fitted(model):
    return gk.fit_selection(model, _Tok(), random_stats(model), prompts=_prompts(), gen_tokens=8, batch_size=4,
                            sensitivity_prompts=4, progress=False)


# ---- λ(n) ---------------------------------------------------------------------------------------

def test_lam_of_length_limits_and_monotone():
    n = torch.tensor([0, 1, 10, 100, 1000])
    lam = A.lam_of_length(50.0, n)
    assert lam[0] == 1.0  # no prompt evidence: the prior alone
    assert torch.all(lam[1:] < lam[:-1])
    assert lam[3] == pytest.approx(50 / 150)
    assert torch.all(A.lam_of_length(0.0, n[1:]) == 0.0)  # tau 0 = GRIFFIN
    assert torch.all(A.lam_of_length(math.inf, n) == 1.0)  # tau inf = global only


# ---- the proxy ----------------------------------------------------------------------------------

@pytest.mark.parametrize("D,k,lam", [(37, 1, 0.3), (64, 20, 0.75), (101, 101, 0.5), (50, 17, 0.0), (50, 17, 1.0)])
def test_captured_mass_is_the_selected_sets_share(D, k, lam):
    g = torch.Generator().manual_seed(D + k)
    local = torch.rand(D, generator=g).round(decimals=1)  # ties on purpose
    ranks = torch.randperm(D, generator=g).to(torch.int32) + 1
    oracle = torch.rand(D, generator=g)
    idx = gk.ops.select_neurons(local[None].contiguous(), ranks, lam, k)[0].long()
    assert A.captured_mass(local, ranks, oracle, lam, k) == pytest.approx(float(oracle[idx].sum() / oracle.sum()))


def test_fit_tau_prefers_the_informative_ranking():
    """Oracle = global statistic: tau = inf wins; oracle = local statistic: tau = 0 wins."""
    g = torch.Generator().manual_seed(0)
    D, L = 64, 2
    glob = [torch.rand(D, generator=g) for _ in range(L)]
    ranks = [stat_ranks(s) for s in glob]
    samples = []
    for _ in range(6):
        local = [torch.rand(D, generator=g) for _ in range(L)]
        samples.append(A.FitSample(20, local, [glob[l] ** 4 for l in range(L)]))
    score, grid = A.fit_tau(samples, ranks)
    assert grid[int(score.mean(0).argmax())] == math.inf
    samples = [A.FitSample(20, s.prompt, [p ** 4 for p in s.prompt]) for s in samples]
    score, grid = A.fit_tau(samples, ranks)
    assert grid[int(score.mean(0).argmax())] == 0.0


# ---- per-layer keep -----------------------------------------------------------------------------

@pytest.mark.parametrize("keep", [0.05, 0.3, 0.5, 0.9, 1.0])
def test_layer_k_spends_exactly_the_uniform_budget(keep):
    fit = _fit(L=3)
    D, rows = [100, 100, 100], [12, 12, 12]
    k = fit.layer_k(keep, D, rows)
    uniform = [max(1, math.floor(keep * d + 1e-9)) for d in D]
    assert sum(kk * r for kk, r in zip(k, rows)) == sum(u * r for u, r in zip(uniform, rows))
    assert all(1 <= kk <= d for kk, d in zip(k, D))


def test_layer_k_gives_more_to_the_sensitive_layer():
    fit = _fit(L=3, loss=torch.stack([(1 - torch.tensor(A.KEEP_GRID, dtype=torch.float64)) * w for w in (1, 10, 1)]))
    k = fit.layer_k(0.5, [200, 200, 200], [6, 6, 6])
    assert k[1] > k[0] and k[1] > k[2]
    assert sum(k) == 300


def test_layer_k_never_exceeds_the_budget_with_unequal_rows():
    fit = _fit(L=2)
    k = fit.layer_k(0.4, [90, 300], [7, 5])
    assert sum(kk * r for kk, r in zip(k, [7, 5])) <= 36 * 7 + 120 * 5
    with pytest.raises(ValueError, match="layers"):
        fit.layer_k(0.4, [90], [7])


@pytest.mark.parametrize("keep", [0.05, 0.3, 0.5])
def test_layer_k_applies_the_share_of_the_reallocation(keep):
    """Share 0: the uniform split; 1: the loss curves' allocation; between: between them, and the
    same budget at every share."""
    grid = torch.tensor(A.KEEP_GRID, dtype=torch.float64)
    fit = _fit(L=4, loss=torch.stack([(1 - grid) * w for w in (1, 12, 3, 0.2)]))
    D, rows = [300, 300, 300, 300], [8, 8, 8, 8]
    uniform = [max(1, math.floor(keep * d + 1e-9)) for d in D]
    full = fit.allocate(keep, D, rows)
    assert full != uniform  # the curves differ, so the allocation moves neurons
    moved = []
    for share in A.SHRINK_GRID:
        k = dataclasses.replace(fit, keep_shrink=share).layer_k(keep, D, rows)
        assert sum(k) == sum(uniform)
        if share == 0:
            assert k == uniform
        if share == 1:
            assert k == full
        # each layer within the interpolation, up to what the rounding leaves (< one neuron per layer)
        for kk, u, f in zip(k, uniform, full):
            assert min(u, f) - len(D) <= kk <= max(u, f) + len(D)
        moved.append(sum(abs(kk - u) for kk, u in zip(k, uniform)))
    assert moved == sorted(moved)  # a larger share moves at least as many neurons


def test_plan_moves_pairs_the_most_valuable_with_the_cheapest():
    gain = [5.0, 1.0, 9.0, 0.5, 3.0, 2.0]
    cost = [6.0, 0.2, 8.0, 0.1, 4.0, 2.5]
    # takers by gain: 2, 0, 4, 5, 1, 3; givers by cost: 3, 1, 5, 4, 0, 2
    assert A.plan_moves(gain, cost, 6) == [(3, 2), (1, 0), (5, 4)]  # then 5 (2.0) would take from 4: spent
    assert A.plan_moves(gain, cost, 1) == [(3, 2)]
    assert A.plan_moves([1.0, 1.0], [2.0, 2.0], 5) == []  # no gain exceeds a cost
    moves = A.plan_moves([3.0, 0.0, 0.0], [0.0, 1.0, 1.0], 3)  # layer 0 is best and cheapest: it only takes
    assert moves == [(1, 0)]


def test_apply_moves_keeps_the_budget():
    D, rows = [160, 160, 160], [6, 6, 6]
    k = A.apply_moves([80, 80, 80], [(0, 2)], D, rows)
    assert k == [70, 80, 90] and sum(k) == 240
    k = A.apply_moves([80, 40], [(0, 1)], [160, 64], [6, 9])  # unequal rows: whole neurons the elements pay for
    assert k == [70, 46] and 70 * 6 + 46 * 9 <= 80 * 6 + 40 * 9
    assert A.apply_moves([3, 80], [(0, 1)], [160, 160], [6, 6])[0] == 1  # a layer keeps at least one neuron


def _refined(fit, keeps, rows):
    return dataclasses.replace(fit, refine_keeps=torch.tensor(keeps, dtype=torch.float64),
                               refine=torch.tensor(rows, dtype=torch.float64))


def test_layer_k_applies_the_refinement_of_the_nearest_keep():
    fit = _fit(L=3)
    D, rows = [160, 160, 160], [6, 6, 6]
    ref = _refined(fit, [0.5, 0.25], [[-1 / 16, 0.0, 1 / 16], [0.0, 1 / 16, -1 / 16]])
    base = fit.layer_k(0.5, D, rows)
    assert ref.layer_k(0.5, D, rows) == [base[0] - 10, base[1], base[2] + 10]
    assert ref.unrefined().layer_k(0.5, D, rows) == base
    base = fit.layer_k(0.3, D, rows)  # nearest refined keep 0.25, changes scaled by 0.3 / 0.25
    assert ref.layer_k(0.3, D, rows) == [base[0], base[1] + 12, base[2] - 12]
    for keep in (0.05, 0.4, 0.9, 1.0):  # never beyond the uniform budget, every layer within [1, D]
        k = ref.layer_k(keep, [90, 300, 40], [7, 5, 9])
        uniform = [max(1, math.floor(keep * d + 1e-9)) for d in (90, 300, 40)]
        assert sum(a * r for a, r in zip(k, [7, 5, 9])) <= sum(u * r for u, r in zip(uniform, [7, 5, 9]))
        assert all(1 <= a <= d for a, d in zip(k, (90, 300, 40)))


def test_selection_fit_validates():
    with pytest.raises(ValueError, match="tau"):
        _fit(tau=-1.0)
    with pytest.raises(ValueError, match="shape"):
        A.SelectionFit(1.0, [1.0, 2.0], torch.tensor(A.KEEP_GRID), torch.zeros(3, len(A.KEEP_GRID)))
    with pytest.raises(ValueError, match="keep_grid"):
        A.SelectionFit(1.0, [1.0], torch.tensor([0.5, 0.2]), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="finite"):
        A.SelectionFit(1.0, [1.0], torch.tensor([0.2, 0.5]), torch.tensor([[float("nan"), 0.0]]))
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep_shrink"):
            A.SelectionFit(1.0, [1.0], torch.tensor([0.2, 0.5]), torch.zeros(1, 2), keep_shrink=bad)
    fit = _fit(L=2)
    with pytest.raises(ValueError, match="shape"):
        _refined(fit, [0.5], [[0.0, 0.0, 0.0]])
    for keeps, rows in (([0.0], [[0.0, 0.0]]), ([0.5], [[2.0, 0.0]]), ([0.5], [[float("nan"), 0.0]])):
        with pytest.raises(ValueError, match="refine"):
            _refined(fit, keeps, rows)
    with pytest.raises(ValueError, match="refine_keeps without refine"):
        A.SelectionFit(1.0, [1.0, 2.0], fit.keep_grid, fit.layer_loss, refine_keeps=torch.tensor([0.5]))


# ---- storage --------------------------------------------------------------------------------------

def test_fit_round_trips_through_the_stats_file(model, fitted, tmp_path):
    p = tmp_path / "s.safetensors"
    fitted.save(p)
    back = gk.GlobalStats.load(p, model=model)
    assert back.fit.tau == fitted.fit.tau and back.fit.layer_tau == fitted.fit.layer_tau
    assert torch.equal(back.fit.layer_loss, fitted.fit.layer_loss)
    assert back.fit.meta == fitted.fit.meta
    assert back.fit.keep_shrink == fitted.fit.keep_shrink
    assert torch.equal(back.fit.refine_keeps, fitted.fit.refine_keeps) and torch.equal(back.fit.refine, fitted.fit.refine)
    # stats without a fit still load, and say so when an adaptive option needs one
    plain = random_stats(model)
    plain.save(tmp_path / "plain.safetensors")
    assert gk.GlobalStats.load(tmp_path / "plain.safetensors").fit is None


def _save_without(stats, path, tensor_name):
    """Save ``stats`` to ``path``, then rewrite the file without one tensor (and without the checksum,
    so that the loader judges the contents, not the checksum)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    stats.save(path)
    with safe_open(str(path), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(str(path))
    del tensors[tensor_name]
    header.pop("checksum")
    save_file(tensors, str(path), metadata=header)


def test_fit_file_from_before_the_share_loads_with_the_whole_reallocation(model, fitted, tmp_path):
    """Files written before fit.keep_shrink existed apply the loss curves' allocation in full, as
    they did when they were written."""
    p = tmp_path / "s.safetensors"
    _save_without(fitted.with_fit(dataclasses.replace(fitted.fit, keep_shrink=0.25)), p, "fit.keep_shrink")
    back = gk.GlobalStats.load(p, model=model)
    assert back.fit.keep_shrink == 1.0 and back.fit.tau == fitted.fit.tau


def test_fit_file_from_before_the_refinement_loads_unrefined(model, fitted, tmp_path):
    p = tmp_path / "s.safetensors"
    refined = fitted.with_fit(_refined(fitted.fit, [0.5], [[0.0625, -0.0625]]))
    _save_without(refined, p, "fit.refine")
    with pytest.raises(StatsFileError, match="refine_keeps without refine"):  # half of it: refused
        gk.GlobalStats.load(p)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(p))
    del tensors["fit.refine_keeps"]
    from safetensors import safe_open

    with safe_open(str(p), framework="pt") as f:
        header = f.metadata()
    save_file(tensors, str(p), metadata=header)
    back = gk.GlobalStats.load(p, model=model)
    assert back.fit.refine_keeps.numel() == 0 and back.fit.refine.shape == (0, 2)


def test_partial_fit_in_file_is_rejected(model, fitted, tmp_path):
    p = tmp_path / "s.safetensors"
    _save_without(fitted, p, "fit.layer_loss")
    with pytest.raises(StatsFileError, match="partial selection fit"):
        gk.GlobalStats.load(p)


# ---- config and patch -----------------------------------------------------------------------------

def test_config_accepts_the_adaptive_modes_and_names_bad_ones():
    assert gk.GlassConfig(lam="length").adaptive
    assert gk.GlassConfig(keep_split="fitted").adaptive
    assert not gk.GlassConfig(lam=0.5).adaptive
    with pytest.raises(ValueError, match="length"):
        gk.GlassConfig(lam="auto")
    with pytest.raises(ValueError, match="keep_split"):
        gk.GlassConfig(keep_split="greedy")
    with pytest.raises(ValueError, match="selecting method"):
        gk.GlassConfig(method="dense", keep_split="fitted")


def test_patch_without_a_fit_names_the_fix(model):
    with pytest.raises(ValueError, match="--fit"):
        gk.patch(model, gk.GlassConfig(lam="length"), stats=random_stats(model))
    # nothing was half-installed: the next patch works
    gk.patch(model, gk.GlassConfig(), stats=random_stats(model))
    gk.unpatch(model)


def test_lam_follows_each_rows_prompt_length(model):
    """Two left-padded prompts of different lengths: each row's set is the aggregation at its own
    λ(n), n = its unpadded token count (the fit's tau chosen so the two λ differ)."""
    stats = random_stats(model).with_fit(_fit(L=2, tau=6.0, layer_tau=[3.0, 40.0]))
    prompts = [[5, 6, 7], list(range(10, 30))]
    ids, mask = R._pad_left(prompts, 0)
    for mode in ("length", "layer"):
        gk.patch(model, gk.GlassConfig(lam=mode, keep=0.4), stats=stats)
        try:
            sess = gk.session(model)
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
                local = sess.local_stats()
                sess._state.select()
            got = sess.neurons()
            k = sess.k
        finally:
            gk.unpatch(model)
        ranks = stats.ranks("activation")
        for l in range(2):
            tau = stats.fit.tau if mode == "length" else stats.fit.layer_tau[l]
            for b, n in enumerate((3, 20)):
                lam = tau / (tau + n)
                want = gk.ops.select_neurons(local[l][b:b + 1].contiguous(), ranks[l], lam, k[l])[0]
                assert torch.equal(got[l][b], want), (mode, l, b)


def test_fitted_keep_reads_the_uniform_bytes(model, fitted):
    gk.patch(model, gk.GlassConfig(keep=0.3, keep_split="fitted"), stats=fitted)
    try:
        k = gk.session(model).k
    finally:
        gk.unpatch(model)
    D = fitted.D
    assert sum(k) == sum(math.floor(0.3 * d) for d in D)  # equal rows in every layer: equal neurons


def test_generate_with_adaptive_options(model, fitted):
    ids = torch.tensor([_prompts()[4]])
    with torch.inference_mode():
        dense = model.generate(ids, max_new_tokens=6, do_sample=False)
    for cfg in (gk.GlassConfig(lam="length", keep=1.0), gk.GlassConfig(lam="layer", keep=1.0)):
        gk.patch(model, cfg, stats=fitted)
        try:
            with torch.inference_mode():
                out = model.generate(ids, max_new_tokens=6, do_sample=False)
            assert gk.session(model).counters()["sparse"] >= 5
        finally:
            gk.unpatch(model)
        assert torch.equal(out, dense)  # keep 1.0: every neuron, whatever lambda
    gk.patch(model, gk.GlassConfig(lam="layer", keep=0.5, keep_split="fitted"), stats=fitted)
    try:
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert out.shape == dense.shape
    finally:
        gk.unpatch(model)


# ---- the fit and the evaluation's fast path ------------------------------------------------------

def test_fit_selection_on_a_tiny_model(model, fitted):
    fit = fitted.fit
    assert fit.num_layers == 2
    assert all(t in A.TAU_GRID for t in [fit.tau] + fit.layer_tau)
    assert torch.all(fit.layer_loss[:, 1:] <= fit.layer_loss[:, :-1] + 1e-12)  # non-increasing in keep
    assert fit.meta["prompts"] == 8 and fit.meta["sensitivity_prompts"] >= 4
    shrink_kl = fit.meta["keep_shrink_kl"]
    assert set(shrink_kl) == {f"{a:g}" for a in A.SHRINK_GRID}
    assert fit.keep_shrink == min(A.SHRINK_GRID, key=lambda a: (shrink_kl[f"{a:g}"], a))
    # share 0 is the uniform split at the shared tau, which the tau search scored on the same tokens
    assert shrink_kl["0"] == pytest.approx(fit.meta["tau_kl"][f"{fit.tau:g}"], rel=1e-6)
    # the refinement: one row per fitted keep; the number of moves applied is the one with the lowest
    # KL on the check prompts (the KL-scored batch the sensitivity passes did not see), a tie to fewer
    assert fit.refine_keeps.tolist() == list(A.FIT_KEEPS) and fit.refine.shape == (len(A.FIT_KEEPS), 2)
    assert fit.meta["refine_check_prompts"] == 4
    _check_refinement(fit)
    with pytest.raises(ValueError, match="at least one prompt"):
        gk.fit_selection(model, _Tok(), random_stats(model), prompts=[], progress=False)


def _check_refinement(fit):
    for j, keep in enumerate(A.FIT_KEEPS):
        r = fit.meta["refine"][f"{keep:g}"]
        scored = {int(n): v for n, v in r["check_kl"].items()}
        assert 0 in scored and len(r["moves"]) in scored
        assert r["applied_moves"] == min(scored, key=lambda n: (scored[n], n))
        assert bool(fit.refine[j].any()) == (r["applied_moves"] > 0)
        assert A.refine_summary(f"{keep:g}", r).startswith(f"keep {keep:g}: {r['applied_moves']} of ")


def test_fit_without_check_prompts_lets_the_sensitivity_prompts_decide(model):
    """When every KL-scored batch was also a sensitivity batch, no other prompts are left: the
    sensitivity prompts' KL picks the number of moves (recorded as such)."""
    fit = gk.fit_selection(model, _Tok(), random_stats(model), prompts=_prompts(), gen_tokens=8, batch_size=4,
                           sensitivity_prompts=8, progress=False).fit
    assert fit.meta["refine_check_prompts"] == "the sensitivity prompts"
    _check_refinement(fit)
    for keep in A.FIT_KEEPS:
        assert fit.meta["refine"][f"{keep:g}"]["check_kl"]["0"] == fit.meta["refine"][f"{keep:g}"]["kl_fitted"]


def test_refine_summary_reads_fits_from_before_the_check():
    old = {"kl_fitted": 1.2, "kl_refined": 1.1, "moves": [[0, 1], [2, 3]], "applied": True}
    assert A.refine_summary("0.5", old) == "keep 0.5: KL 1.2000 -> 1.1000 by 2 moves (sensitivity prompts)"
    assert A.refine_summary("0.3", old | {"applied": False}).endswith("by 2 moves, not applied (sensitivity prompts)")


def test_fit_rejects_stats_of_another_model(model):
    other = build("llama", seed=4)
    with pytest.raises(StatsMismatchError):
        gk.fit_selection(model, _Tok(), random_stats(other), prompts=_prompts()[:2], progress=False)


@pytest.mark.parametrize("cfg", [dict(lam=0.5), dict(lam="length"), dict(lam="layer", keep_split="fitted"),
                                 dict(method="griffin", keep_split="fitted", keep=0.3)])
def test_one_prompt_pass_scoring_matches_the_patched_model(model, fitted, cfg):
    """The study's shortcut (sets from the reference pass, continuation on a copy of its prompt cache)
    gives the sets and logits of running the prompt through the patched model."""
    gcfg = gk.GlassConfig(**cfg)
    prompts = _prompts()[:4]
    conts = R.dense_continuations(model, _Tok(), prompts, 6, cache_file=None, fingerprint="t", batch_size=8)
    b = R.make_batch(prompts, conts, 0)
    ref = R.reference_pass(model, b, keep_prompt_cache=True)
    fast, sets = R.continuation_logits(model, b, ref, gcfg, fitted, return_sets=True)
    gk.patch(model, gcfg, stats=fitted)
    try:
        with torch.inference_mode():
            slow = R._forward_pair(model, b)
        user = gk.session(model).neurons()
    finally:
        gk.unpatch(model)
    assert all(torch.equal(a, u) for a, u in zip(sets, user))
    torch.testing.assert_close(fast, slow, rtol=0, atol=0)


@pytest.mark.parametrize("extra", [dict(weights="int8"), dict(strategy="compact"), dict(method="i-glass")])
def test_fitted_keep_with_other_options(model, fitted, extra):
    """Per-layer k goes through every decode path: quantized rows, compacted copies, I-GLASS."""
    cfg = gk.GlassConfig(**{"lam": "layer", "keep": 0.4, "keep_split": "fitted", **extra})
    ids = torch.tensor([_prompts()[5]])
    if cfg.weights:  # quantized rows need d % 32 == 0
        import tiny_models

        model = build("llama", seed=3, **tiny_models.width_overrides("llama", 64))
        fitted = gk.fit_selection(model, _Tok(), random_stats(model), prompts=_prompts(), gen_tokens=6,
                                  batch_size=4, sensitivity_prompts=4, progress=False)
    gk.patch(model, cfg, stats=fitted)
    try:
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=5, do_sample=False)
        sess = gk.session(model)
        assert [t.shape[-1] for t in sess.neurons()] == sess.k
        assert sess.counters()["sparse"] == 4
    finally:
        gk.unpatch(model)
    assert out.shape == (1, ids.shape[1] + 5)
