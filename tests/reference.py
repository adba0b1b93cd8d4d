"""Plain float64 references written from the definitions, independent of mapo_fast's code:
full logits, log_softmax, and verl's compute_policy_loss_vanilla + agg_loss + kl_penalty as
verl 0.9 writes them (per-mode sums and divisions, not mapo_fast's per-token weights; the
integration tests check mapo_fast against verl's own functions too)."""

import torch


def logprobs_full(hidden, weight, targets, bias=None, temperature=1.0, logit_scale=1.0,
                  softcap=None):
    """Materialises [N, V] logits: log-probs and entropies, differentiable (a soft cap as
    Gemma-style models apply it: cap * tanh(scale * z / cap))."""
    z = hidden.reshape(-1, hidden.shape[-1]) @ weight.t()
    if bias is not None:
        z = z + bias
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logsm = torch.log_softmax(z / temperature, dim=-1)
    logp = logsm.gather(1, targets.reshape(-1, 1)).squeeze(1)
    ent = -(logsm.exp() * logsm).sum(-1)
    return logp.view(targets.shape), ent.view(targets.shape)


def verl_policy_loss(log_prob, old_log_prob, advantages, clip_low, clip_high, clip_ratio_c=None,
                     rollout_is_weights=None):
    """verl's compute_policy_loss_vanilla, per token (before aggregation)."""
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    if clip_ratio_c is None:
        pg_losses = clip_pg_losses1
    else:
        pg_losses3 = -advantages * clip_ratio_c
        clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
        pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if rollout_is_weights is not None:
        pg_losses = pg_losses * rollout_is_weights
    return pg_losses, ratio, pg_losses2 > pg_losses1


def k3(ref, logp):
    kl = ref - logp
    return torch.exp(kl) - kl - 1


def kl_estimate(kind, logp, ref, ratio):
    """verl's kl_penalty_forward (k1, k2, low_var_kl), the plain k3, and TRL's k3 times the
    importance ratio (use_bias_correction_kl)."""
    if kind == "k1":
        return logp - ref
    if kind == "k2":
        return 0.5 * (logp - ref).square()
    if kind == "k3":
        return k3(ref, logp)
    if kind == "low_var_kl":
        kl = torch.clamp(ref - logp, min=-20, max=20)
        return torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    if kind == "k3_ratio":
        return k3(ref, logp) * ratio
    raise ValueError(kind)


def verl_agg_loss(loss_mat, loss_mask, mode, global_tokens=None, global_seqs=None,
                  loss_scale_factor=None):
    """verl's agg_loss (dp_size = 1), with empty denominators giving 0 instead of NaN."""
    if mode == "token-sum":
        return (loss_mat * loss_mask).sum()
    if mode == "token-mean":
        n = loss_mask.sum() if global_tokens is None else global_tokens
        return (loss_mat * loss_mask).sum() / n if float(n) > 0 else (loss_mat * 0).sum()
    if mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = (loss_mat * loss_mask).sum(-1)
        seq_mask = (loss_mask.sum(-1) > 0).to(loss_mat.dtype)
        s = seq_mask.sum() if global_seqs is None else global_seqs
        loss = (seq_losses * seq_mask).sum() / s if float(s) > 0 else (loss_mat * 0).sum()
        if mode == "seq-mean-token-sum-norm":  # verl >= 0.8: the seq-mean, then the factor
            loss = loss / (loss_mask.shape[-1] if loss_scale_factor is None else loss_scale_factor)
        return loss
    if mode == "seq-mean-token-mean":
        tok = loss_mask.sum(-1)
        seq_mask = (tok > 0).to(loss_mat.dtype)
        seq_losses = (loss_mat * loss_mask).sum(-1) / torch.where(tok > 0, tok, torch.ones_like(tok))
        s = seq_mask.sum() if global_seqs is None else global_seqs
        return (seq_losses * seq_mask).sum() / s if float(s) > 0 else (loss_mat * 0).sum()
    raise ValueError(mode)


def mapo_loss_reference(hidden, weight, targets, advantages, mask, *, old_logprobs=None,
                        ref_logprobs=None, bias=None, clip_low=0.2, clip_high=0.28,
                        clip_ratio_c=None, kl_coef=0.0, loss_agg="token-mean",
                        loss_scale_factor=None, global_tokens=None, global_seqs=None,
                        rollout_is_weights=None, temperature=1.0, kl_type="k3",
                        entropy_coef=0.0, logit_scale=1.0, softcap=None):
    logp, ent = logprobs_full(hidden, weight, targets, bias, temperature, logit_scale, softcap)
    adv = advantages if advantages.shape == targets.shape else advantages[:, None].expand_as(logp)
    old = logp.detach() if old_logprobs is None else old_logprobs
    pg, ratio, _ = verl_policy_loss(logp, old, adv, clip_low, clip_high, clip_ratio_c,
                                    rollout_is_weights)
    m = mask.to(logp.dtype)
    kw = dict(global_tokens=global_tokens, global_seqs=global_seqs,
              loss_scale_factor=loss_scale_factor)
    loss = verl_agg_loss(pg, m, loss_agg, **kw)
    if kl_coef > 0:
        kl = kl_estimate(kl_type, logp, ref_logprobs, ratio)
        loss = loss + kl_coef * verl_agg_loss(kl, m, loss_agg, **kw)
    if entropy_coef != 0:
        loss = loss - entropy_coef * verl_agg_loss(ent, m, loss_agg, **kw)
    return loss, logp, ent, ratio
