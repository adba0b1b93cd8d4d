"""Random inputs of awkward sizes (no dimension a multiple of any block size)."""

import torch

TOL = {  # (atol, rtol) against the float64 reference, by compute dtype of the path under test
    torch.float64: (1e-10, 1e-9),   # same precision, only the summation order differs
    torch.float32: (2e-5, 2e-5),    # fp32 eps 1.2e-7 x O(H + log V) terms per logit and LSE
}


def make_case(B=3, T=7, H=45, V=101, *, dtype=torch.float64, seed=0, bias=False,
              per_seq_adv=False, old=False, ref=False, is_weights=False, empty_seq=True,
              device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale)

    hidden = rnd(B, T, H).to(dtype)
    weight = rnd(V, H, scale=H ** -0.5 * 2).to(dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) < 0.75).to(torch.float32)
    mask[0, 0] = 1.0
    if empty_seq and B > 1:
        mask[1] = 0.0          # a fully masked sequence
    adv = rnd(B) if per_seq_adv else rnd(B, T)
    case = dict(hidden=hidden, weight=weight, targets=targets, advantages=adv, mask=mask)
    if bias:
        case["bias"] = rnd(V, scale=0.5).to(dtype)
    # log-probs near the policy's: ratios spread across both clip boundaries
    if old:
        case["old_logprobs"] = "near"
    if ref:
        case["ref_logprobs"] = "near"
    if is_weights:
        case["rollout_is_weights"] = (torch.rand(B, T, generator=g, dtype=torch.float64) * 1.5)
    for k in ("old_logprobs", "ref_logprobs"):
        if case.get(k) == "near":
            from reference import logprobs_full
            with torch.no_grad():
                lp, _ = logprobs_full(hidden.double(), weight.double(), targets,
                                      case["bias"].double() if bias else None)
            case[k] = lp + rnd(B, T, scale=0.3)
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in case.items()}


def leaf(x):
    return x.detach().clone().requires_grad_(True)
