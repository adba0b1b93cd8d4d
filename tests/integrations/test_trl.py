"""mapo_fast against the released TRL (1.16.0, its own pinned environment: `make test` creates
it on first use; skipped where TRL is not installed), on CPU in float32 with a tiny Qwen2 built
from a config:

- ``MAPOGRPOTrainer._compute_loss`` equals ``GRPOTrainer._compute_loss`` (loss and every
  parameter's gradient) for each supported loss type, with KL (plain and ratio-weighted),
  two-sided clipping (``delta``), a temperature, a fully masked row and gradient accumulation;
- a few training steps of both trainers from one seed log the same loss and grad norm;
- every unsupported option raises ``NotImplementedError`` naming it.
"""

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from mapo_fast.integrations.trl import MAPOGRPOTrainer  # noqa: E402


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    text = ["the cat sat on the mat", "a red circle and a blue square", "zoom in on the sign"]
    tok.train_from_iterator(text * 20, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<pad>", "<eos>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def model(tok, seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg)


def reward(completions, **kwargs):
    return [float(len(c) % 5) for c in completions]


def trainers(tmp_path, **kw):
    """A GRPOTrainer and a MAPOGRPOTrainer, each loading one saved model."""
    from trl import GRPOConfig, GRPOTrainer
    tok = tokenizer()
    data = datasets.Dataset.from_dict({"prompt": ["the cat sat", "a red circle", "zoom in",
                                                  "on the mat"] * 4})
    args = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                max_steps=2, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
                seed=0, learning_rate=1e-2, save_strategy="no")
    args.update(kw)
    path = tmp_path / "model"  # a local checkpoint: TRL loads its reference model from it
    model(tok).save_pretrained(path)
    out = []
    for name, cls in (("trl", GRPOTrainer), ("ours", MAPOGRPOTrainer)):
        out.append(cls(model=str(path), reward_funcs=reward,
                       args=GRPOConfig(output_dir=str(tmp_path / name), **args),
                       train_dataset=data, processing_class=tok))
    return out


def inputs(tr, seed=0, B=4, P=5, L=6):
    g = torch.Generator().manual_seed(seed)
    V = tr.model.config.vocab_size
    mask = (torch.rand(B, L, generator=g) > 0.25).long()
    mask[0] = 0  # a fully masked row
    out = {"prompt_ids": torch.randint(3, V, (B, P), generator=g),
           "prompt_mask": torch.ones(B, P, dtype=torch.long),
           "completion_ids": torch.randint(3, V, (B, L), generator=g),
           "completion_mask": mask, "advantages": torch.randn(B, generator=g),
           "num_items_in_batch": mask.sum().float() * 2}
    out["old_per_token_logps"] = -torch.rand(B, L, generator=g) * 5 - 1.0
    out["ref_per_token_logps"] = -torch.rand(B, L, generator=g) * 5 - 1.0
    return out


CASES = {
    "grpo": dict(loss_type="grpo"),
    "bnpo+kl": dict(loss_type="bnpo", beta=0.04),
    "dr_grpo+delta+temp": dict(loss_type="dr_grpo", delta=1.5, temperature=0.7),
    "dapo+bias_corrected_kl": dict(loss_type="dapo", beta=0.1, use_bias_correction_kl=True,
                                   epsilon_high=0.28),
}


def compute(tr, batch, accum):
    """``tr._compute_loss`` on ``batch``: the loss and every parameter's gradient."""
    tr.model.train()
    tr.current_gradient_accumulation_steps = accum
    tr.model.zero_grad()
    loss = tr._compute_loss(tr.model, dict(batch))
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in tr.model.named_parameters()
                           if p.grad is not None}


def test_bf16_autocast_rounds_the_logits_as_trl(tmp_path):
    """Under bf16 autocast both heads compute the logits as autocast's matmul does
    (``logits_dtype="autocast"``): the loss agrees to 1.2e-7 relative (1.1e-5 with float32
    logits); gradients to bf16 precision (TRL's head backward runs in bf16 matmuls,
    mapo_fast's accumulates in float32)."""
    ref, ours = trainers(tmp_path, loss_type="bnpo", beta=0.04, bf16=True)
    batch = inputs(ref)
    (l_ref, g_ref), (l_ours, g_ours) = compute(ref, batch, 1), compute(ours, batch, 1)
    torch.testing.assert_close(l_ours, l_ref, atol=1e-6, rtol=1e-6)
    for k, g in g_ref.items():
        torch.testing.assert_close(g_ours[k], g, atol=1e-3, rtol=5e-2, msg=k)


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("accum", [1, 2])
def test_loss_and_every_gradient_equal_trl(tmp_path, case, accum):
    ref, ours = trainers(tmp_path, **case)
    batch = inputs(ref)
    res = {name: compute(tr, batch, accum) for name, tr in (("trl", ref), ("ours", ours))}
    torch.testing.assert_close(res["ours"][0], res["trl"][0], atol=1e-6, rtol=1e-5)
    assert res["ours"][1].keys() == res["trl"][1].keys()
    for k, g in res["trl"][1].items():
        torch.testing.assert_close(res["ours"][1][k], g, atol=1e-6, rtol=1e-4, msg=k)


def test_training_steps_log_the_same_loss_and_grad_norm(tmp_path):
    ref, ours = trainers(tmp_path, loss_type="dapo", beta=0.04, max_steps=3)
    logs = {}
    for name, tr in (("trl", ref), ("ours", ours)):
        torch.manual_seed(0)
        tr.train()
        logs[name] = [(h["loss"], h["grad_norm"]) for h in tr.state.log_history
                      if "loss" in h]
    assert len(logs["trl"]) == 3
    torch.testing.assert_close(torch.tensor(logs["ours"]), torch.tensor(logs["trl"]),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("option, value", [("loss_type", "sapo"), ("top_entropy_quantile", 0.5),
                                           ("importance_sampling_level", "sequence"),
                                           ("entropy_coef", 0.01),
                                           ("off_policy_mask_threshold", 0.5)])
def test_unsupported_options_are_named(tmp_path, option, value):
    from trl import GRPOConfig
    tok = tokenizer()
    data = datasets.Dataset.from_dict({"prompt": ["the cat sat"] * 4})
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=4, report_to="none",
                      use_cpu=True, bf16=False, **{option: value})
    with pytest.raises(NotImplementedError, match=f"{option}={value!r}"):
        MAPOGRPOTrainer(model=model(tok), reward_funcs=reward, args=args, train_dataset=data,
                        processing_class=tok)


def test_semantic_scores_fn_gives_per_token_advantages(tmp_path):
    """``semantic_scores_fn(batch) -> [B, T]`` runs once per generation batch, on TRL's batch
    plus the rows and the group ids, before TRL shuffles and splits it; its result is the
    batch's advantages, and the loss on it equals TRL's loss given those advantages."""
    ref, ours = trainers(tmp_path, loss_type="bnpo")
    seen = {}

    def per_token(batch):  # e.g. MAPO's credit on the tool turns' tokens
        seen.update(batch)
        adv = batch["advantages"][:, None].expand_as(batch["completion_mask"]).clone()
        adv[:, 2:4] += 0.5
        return adv
    ours.semantic_scores_fn = per_token
    rows = [{"prompt": p} for p in ("the cat sat", "zoom in") for _ in range(4)]
    torch.manual_seed(0)
    ours.model.train()
    batch = ours._generate_and_score_completions(rows)
    assert seen["inputs"] == rows and seen["group_ids"].tolist() == [0] * 4 + [1] * 4
    torch.testing.assert_close(batch["advantages"][:, 2], seen["advantages"] + 0.5)
    l_ours, g_ours = compute(ours, batch, 1)
    l_ref, g_ref = compute(ref, batch, 1)
    torch.testing.assert_close(l_ours, l_ref, atol=1e-6, rtol=1e-5)
    for k, g in g_ref.items():
        torch.testing.assert_close(g_ours[k], g, atol=1e-6, rtol=1e-4, msg=k)
    ours.semantic_scores_fn = lambda b: b["advantages"]
    with pytest.raises(ValueError, match=r"must return a \[B, T\] = \[8, 6\] tensor, got \(8,\)"):
        ours._generate_and_score_completions(rows)


def test_the_compatibility_check_names_versions_and_missing_symbols(monkeypatch):
    """Building MAPOGRPOTrainer checks TRL first: the tested range, every private symbol the
    integration overrides or reads (mapo_fast.integrations._compat.TRL)."""
    from mapo_fast.integrations import _compat
    assert _compat.check(_compat.TRL) == "1.16.0"
    monkeypatch.setattr(_compat, "installed_version", lambda name: "1.20.0")
    with pytest.warns(UserWarning, match=r"trl 1.20.0 is installed; the integration is tested "
                                         r"with trl >= 1.16.0, < 1.17"):
        _compat.check(_compat.TRL)
    gone = _compat.Framework("trl", ("1.16.0", "1.17"),
                             (("trl:GRPOTrainer._no_such_method", "a test"),))
    with pytest.raises(ImportError, match="has no `trl:GRPOTrainer._no_such_method`"):
        _compat.check(gone)
