"""The rollout benchmark's workloads (``bench_rollout.py``): their sizes per scale, the random
weight Qwen2 and word-level tokenizer they run on, their prompts and observations, the fixed
tool runner that answers each call, and the logits processor that ends every turn at the
same length (so every engine does the same amount of generation)."""

from __future__ import annotations

import torch

IMAGE = {"quick": dict(prompts=1, group=2, image=224, crop=112, turns=1, new=40, layers=2,
                       hidden=128, vision_hidden=64, vision_layers=1, min_pixels=56 * 56,
                       max_pixels=1280 * 28 * 28),
         "cpu": dict(prompts=4, group=8, image=896, crop=448, turns=3, new=64, layers=8,
                     hidden=512, vision_hidden=256, vision_layers=4, min_pixels=56 * 56,
                     max_pixels=1280 * 28 * 28),
         "gpu": dict(prompts=4, group=8, image=896, crop=448, turns=3, new=64, layers=16,
                     hidden=2048, vision_hidden=1024, vision_layers=8, min_pixels=56 * 56,
                     max_pixels=1280 * 28 * 28)}
SCALES = {"quick": dict(prompts=2, group=2, prompt_len=128, turns=1, new=16, obs=32,
                        layers=2, hidden=128, image=IMAGE["quick"]),
          "cpu": dict(prompts=4, group=8, prompt_len=1024, turns=3, new=64, obs=256,
                      layers=4, hidden=512, image=IMAGE["cpu"]),
          "gpu": dict(prompts=4, group=8, prompt_len=1024, turns=3, new=64, obs=256,
                      layers=16, hidden=2048, image=IMAGE["gpu"])}
# the prefill workload: prompts of min_len..max_len tokens, one tool turn
PREFILL = {"quick": dict(prompts=4, group=2, min_len=20, max_len=200, new=8, obs=8),
           "cpu": dict(prompts=16, group=8, min_len=200, max_len=2000, new=32, obs=64),
           "gpu": dict(prompts=16, group=8, min_len=200, max_len=2000, new=32, obs=64)}
for _k, _v in SCALES.items():
    _v["prefill"] = PREFILL[_k]
VOCAB = 32000
OBS_TEMPLATE = "<tool_response> {} </tool_response>"


def make_model(cfg, device):
    """The scale's random-weight Qwen2 (``hidden`` wide, ``layers`` deep, a tied 32k vocabulary
    plus the tool tags), in eval mode on ``device``, bf16 on CUDA, SDPA attention."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    h = cfg["hidden"]
    conf = Qwen2Config(vocab_size=VOCAB + 8, hidden_size=h, intermediate_size=int(h * 2.75),
                       num_hidden_layers=cfg["layers"], num_attention_heads=max(4, h // 64),
                       num_key_value_heads=2, max_position_embeddings=8192,
                       tie_word_embeddings=True)
    model = Qwen2ForCausalLM(conf).eval().to(device)
    if device.type == "cuda":
        model = model.to(torch.bfloat16)
    model.config._attn_implementation = "sdpa"
    return model


def make_tokenizer():
    """Word-level: token i <-> 'w{i}', plus the tool tags (single tokens)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    vocab = {f"w{i}": i for i in range(VOCAB)}
    for j, t in enumerate(["<pad>", "<tool_call>", "</tool_call>", "<tool_response>",
                           "</tool_response>"]):
        vocab[t] = VOCAB + j
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>")


def workload(cfg, seed=0):
    """The text workloads' prompts (``prompts`` of ``prompt_len`` random words) and the
    ``turns`` observations (``obs`` words each), drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (cfg["prompt_len"],), generator=g).tolist()
               for _ in range(cfg["prompts"])]
    obs = [torch.randint(0, VOCAB, (cfg["obs"],), generator=g).tolist()
           for _ in range(cfg["turns"])]
    return prompts, obs


class FixedObservation:
    """A tool runner whose k-th call returns the k-th fixed observation text."""

    def __init__(self, obs_texts):
        self.obs_texts = obs_texts

    def run(self, texts, contexts, sessions):
        from mapo_fast.tools import ToolResult
        out = []
        for sess in sessions:
            k = sess.calls
            sess.calls += 1
            out.append(ToolResult(ok=True, text=self.obs_texts[min(k, len(self.obs_texts) - 1)]))
        return out


class EndTurnAt:
    """Forces `</tool_call>` as the `n`-th token of every turn (turns restart after each
    observation, recognised by its closing tag) and keeps to ordinary words otherwise; one
    ``batch`` call per step (the sampler's batched processor interface). ``prompts``: the
    prompts (a sequence's is recognised by its first tokens)."""

    def __init__(self, n, end_id, obs_end_id, prompts):
        self.n, self.end_id, self.obs_end_id = n, end_id, obs_end_id
        self.prompt_len = {tuple(p[:16]): len(p) for p in prompts}

    def _position(self, tokens) -> int:
        """The position in its turn (from 1) of the token about to be drawn."""
        start = self.prompt_len[tuple(tokens[:16])]
        tail = tokens[start:]
        last = len(tail) - 1 - tail[::-1].index(self.obs_end_id) if \
            self.obs_end_id in tail else -1
        return len(tail) - last

    def batch(self, token_lists, logits):
        force = [i for i, t in enumerate(token_lists) if self._position(t) == self.n]
        out = logits.clone()
        out[:, VOCAB:] = float("-inf")
        if force:  # one step in N
            out[force] = float("-inf")
            out[force, self.end_id] = 0.0
        return out

    def __call__(self, tokens, logits):  # one row: for a --before engine without ``batch``
        return self.batch([tokens], logits[None])[0]


def kv_bytes(model, tokens: int) -> int:
    """Bytes of K and V that ``tokens`` tokens hold in ``model``'s cache (every layer)."""
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * tokens * \
        next(model.parameters()).element_size()


def observation_ids(tok, text: str) -> list:
    """The token ids of observation ``text`` inserted in ``OBS_TEMPLATE``."""
    return tok(OBS_TEMPLATE.format(text), add_special_tokens=False)["input_ids"]


def prefill_inputs(cfg):
    """The prefill workload's prompts (``min_len`` to ``max_len`` tokens) and observation."""
    c = cfg["prefill"]
    g = torch.Generator().manual_seed(1)
    lengths = torch.linspace(c["min_len"], c["max_len"], c["prompts"]).long()
    lengths = lengths[torch.randperm(c["prompts"], generator=g)].tolist()
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]
    obs = [torch.randint(0, VOCAB, (c["obs"],), generator=g).tolist()]
    return prompts, obs


