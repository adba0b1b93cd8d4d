import itertools
import math
import statistics

import pytest
import torch

import mapo_fast

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def ragged_batch(seed=0, T=13):
    """Groups of sizes 1, 2, 3, 5 and 4 (the last with identical rewards and scores),
    interleaved; trajectories with 0..4 tool turns; K = 4."""
    g = torch.Generator().manual_seed(seed)
    sizes = {10: 1, 11: 2, 12: 3, 13: 5, 14: 4}
    group_ids = torch.tensor([gid for gid, n in sizes.items() for _ in range(n)])
    group_ids = group_ids[torch.randperm(len(group_ids), generator=g)]
    B, K = len(group_ids), 4
    rewards = torch.randint(0, 3, (B,), generator=g).double() + 0.1 * torch.rand(B, generator=g,
                                                                                 dtype=torch.float64)
    n_turns = torch.randint(0, K + 1, (B,), generator=g)
    turn_mask = torch.arange(K)[None, :] < n_turns[:, None]
    scores = torch.rand(B, K, generator=g, dtype=torch.float64)
    scores[~turn_mask] = float("nan")  # padding is never read
    same = group_ids == 14
    rewards[same] = 0.7
    scores[same] = 0.25
    token_turn = torch.full((B, T), -1)
    for b in range(B):  # turn k owns tokens [2 + 2k, 4 + 2k); the rest is prompt/answer
        for k in range(int(n_turns[b])):
            token_turn[b, 2 + 2 * k: 4 + 2 * k] = k
    return rewards, group_ids, scores, turn_mask, token_turn


def python_reference(rewards, group_ids, scores, turn_mask, token_turn, *, coef=1.0,
                     norm_std=True, eps=1e-6, loo=False, discount=0.0):
    B, T = token_turn.shape
    R = rewards.tolist()
    gid = group_ids.tolist()

    def norm(values, i):
        n = len(values)
        if n < 2 or max(values) == min(values):
            return 0.0
        base = (sum(values) - values[i]) / (n - 1) if loo else statistics.fmean(values)
        out = values[i] - base
        return out / (statistics.stdev(values) + eps) if norm_std else out

    out = []
    for b in range(B):
        members = [j for j in range(B) if gid[j] == gid[b]]
        out.append(norm([R[j] for j in members], members.index(b)))
    sem = [[0.0] * scores.shape[1] for _ in range(B)]
    for b in range(B):
        members = [j for j in range(B) if gid[j] == gid[b]]
        turns = [(j, k) for j in members for k in range(scores.shape[1]) if turn_mask[j, k]]
        vals = [float(scores[j, k]) for j, k in turns]
        for k in range(scores.shape[1]):
            if turn_mask[b, k]:
                sem[b][k] = norm(vals, turns.index((b, k)))
    cred = [[sum(discount ** (j - k) * sem[b][j] for j in range(k, len(sem[b])) if turn_mask[b, j])
             if discount > 0 else sem[b][k] for k in range(len(sem[b]))] for b in range(B)]
    A = torch.empty(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            k = int(token_turn[b, t])
            A[b, t] = out[b] + (coef * cred[b][k] if k >= 0 else 0.0)
    return A


OPTIONS = [dict(coef=c, norm_std=n, loo=l, discount=d)
           for c, n, l, d in itertools.product([1.0, 0.3], [True, False], [False, True], [0.0, 0.5])]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_matches_hand_computed_reference(opts):
    batch = ragged_batch(seed=1)
    got = mapo_fast.mapo_advantages(*batch, semantic_coef=opts["coef"], norm_std=opts["norm_std"],
                                    baseline="loo" if opts["loo"] else "mean",
                                    turn_discount=opts["discount"])
    want = python_reference(*batch, **opts)
    assert got.dtype == torch.float64 and got.shape == batch[4].shape
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_group_of_one_and_zero_spread_give_zero_never_nan():
    """Each part is zero where its group statistic is degenerate: the outcome part for a group
    of one trajectory; both parts for the group whose rewards and scores have no spread. (A
    lone trajectory with several turns still has a semantic spread across its own turns.)"""
    rewards, group_ids, scores, turn_mask, token_turn = ragged_batch(seed=2)
    adv, parts = mapo_fast.mapo_advantages(rewards, group_ids, scores, turn_mask, token_turn,
                                           return_parts=True)
    assert torch.isfinite(adv).all()
    lone, flat = group_ids == 10, group_ids == 14
    assert parts["outcome"][lone].item() == 0.0
    assert torch.count_nonzero(adv[lone][token_turn[lone] < 0]) == 0
    assert torch.count_nonzero(adv[flat]) == 0
    one_turn = torch.tensor([1.0, 2.0]), torch.tensor([0, 1])  # two groups of one
    sem = torch.tensor([[0.3, 0.0], [0.9, 0.0]])
    mask = torch.tensor([[True, False], [True, False]])
    tt = torch.tensor([[0, -1], [0, -1]])
    assert torch.count_nonzero(mapo_fast.mapo_advantages(*one_turn, sem, mask, tt)) == 0


def test_semantic_coef_zero_is_grpo_exactly():
    batch = ragged_batch(seed=3)
    rewards, group_ids, _, _, token_turn = batch
    mapo0 = mapo_fast.mapo_advantages(*batch, semantic_coef=0.0)
    grpo = mapo_fast.mapo_advantages(rewards, group_ids, token_turn=token_turn, algo="grpo")
    per_seq = mapo_fast.mapo_advantages(rewards, group_ids, algo="grpo")
    assert torch.equal(mapo0, grpo)
    assert torch.equal(grpo, per_seq[:, None].expand_as(grpo))
    # GRPO as verl/TRL write it: (R - mean) / (unbiased std + eps) within each group
    for gid in group_ids.unique():
        sel = group_ids == gid
        r = rewards[sel]
        want = (r - r.mean()) / (r.std() + 1e-6) if sel.sum() > 1 and r.std() > 0 else r * 0
        torch.testing.assert_close(per_seq[sel], want, atol=1e-12, rtol=0)


def test_parts_and_float32():
    batch = ragged_batch(seed=4)
    rewards = batch[0].float()
    adv, parts = mapo_fast.mapo_advantages(rewards, *batch[1:], return_parts=True)
    assert adv.dtype == torch.float32
    assert parts["outcome"].shape == rewards.shape and parts["semantic"].shape == batch[2].shape
    recon = parts["outcome"][:, None] + torch.where(
        batch[4] >= 0, parts["semantic"].gather(1, batch[4].clamp_min(0)), 0.0)
    torch.testing.assert_close(adv, recon)


@pytest.mark.parametrize("opts", OPTIONS[::3], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_triton_kernel_equals_torch_path(opts, monkeypatch):
    pytest.importorskip("triton")
    batch = [x.to(DEV) for x in ragged_batch(seed=5, T=37)]
    batch[0] = batch[0].float()
    batch[2] = batch[2].float()
    kw = dict(semantic_coef=opts["coef"], norm_std=opts["norm_std"],
              baseline="loo" if opts["loo"] else "mean", turn_discount=opts["discount"])
    monkeypatch.setenv("MAPO_FAST_BACKEND", "torch")
    want = mapo_fast.mapo_advantages(*batch, **kw)
    monkeypatch.setenv("MAPO_FAST_BACKEND", "triton")
    from mapo_fast.kernels import advantage as K
    got = mapo_fast.mapo_advantages(*batch, **kw)
    # poisoned output buffer: every element must be written
    poisoned = torch.full(batch[4].shape, float("nan"), device=DEV)
    seg = torch.unique(batch[1], return_inverse=True)[1]
    K.advantages(batch[0], seg, int(seg.max()) + 1, batch[2], batch[3].bool(), batch[4],
                 coef=opts["coef"], norm_std=opts["norm_std"], eps=1e-6, loo=opts["loo"],
                 discount=opts["discount"], max_group=int(torch.bincount(seg).max()),
                 out=poisoned)
    # fp32 sums in a different order than torch's: a few ulps of values of order 1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(poisoned, want, atol=1e-5, rtol=1e-5)


def test_large_groups_take_the_torch_path(monkeypatch):
    """Groups beyond the kernel's largest compiled block (64) go to the torch path."""
    pytest.importorskip("triton")
    from mapo_fast.kernels import advantage as K
    monkeypatch.setenv("MAPO_FAST_BACKEND", "triton")
    calls = []
    monkeypatch.setattr(K, "advantages", lambda *a, **k: calls.append(1))
    rewards = torch.rand(65)
    adv = mapo_fast.mapo_advantages(rewards, torch.zeros(65, dtype=torch.long),
                                    token_turn=torch.full((65, 3), -1), algo="grpo")
    assert calls == [] and adv.shape == (65, 3)
    assert not K.supports(65, 1) and not K.supports(4, 33) and K.supports(64, 32)


def test_triton_grpo_per_sequence(monkeypatch):
    pytest.importorskip("triton")
    rewards, group_ids = ragged_batch(seed=6)[:2]
    monkeypatch.setenv("MAPO_FAST_BACKEND", "triton")
    got = mapo_fast.mapo_advantages(rewards.float().to(DEV), group_ids.to(DEV), algo="grpo")
    monkeypatch.setenv("MAPO_FAST_BACKEND", "torch")
    want = mapo_fast.mapo_advantages(rewards.float(), group_ids, algo="grpo")
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def _bad(batch, **over):
    names = ("rewards", "group_ids", "semantic_scores", "turn_mask", "token_turn")
    args = dict(zip(names, batch))
    kw = {k: over.pop(k) for k in list(over) if k not in names}
    args.update(over)
    return lambda: mapo_fast.mapo_advantages(**args, **kw)


@pytest.mark.parametrize("make, arg, value", [
    (lambda b: dict(group_ids=b[1][:-1]), "group_ids", "(14,)"),
    (lambda b: dict(group_ids=b[1].double()), "group_ids", "torch.float64"),
    (lambda b: dict(rewards=torch.where(torch.arange(15) == 3, math.nan, b[0])), "rewards", "nan"),
    (lambda b: dict(semantic_scores=torch.where(b[3], math.inf, b[2])), "semantic_scores", "inf"),
    (lambda b: dict(token_turn=torch.where(b[4] == 0, 7, b[4])), "token_turn", "7"),
    (lambda b: dict(token_turn=b[4] - 2), "token_turn", "-3"),
    (lambda b: dict(turn_mask=torch.zeros_like(b[3])), "token_turn", "invalid"),
    (lambda b: dict(turn_mask=b[3][:, :2]), "turn_mask", "(15, 2)"),
    (lambda b: dict(semantic_scores=None), "semantic_scores", "required"),
    (lambda b: dict(token_turn=None), "token_turn", "required"),
    (lambda b: dict(algo="ppo"), "algo", "'ppo'"),
    (lambda b: dict(baseline="median"), "baseline", "'median'"),
    (lambda b: dict(eps=0.0), "eps", "0.0"),
    (lambda b: dict(turn_discount=1.5), "turn_discount", "1.5"),
    (lambda b: dict(semantic_coef=math.nan), "semantic_coef", "nan"),
])
def test_bad_input_names_the_argument(make, arg, value):
    batch = ragged_batch(seed=7)
    with pytest.raises(ValueError) as err:
        _bad(batch, **make(batch))()
    assert f"`{arg}`" in str(err.value) and value in str(err.value), str(err.value)
