"""The installed wheel, from outside the repository: run as ``python tests/wheel_smoke.py``
from any directory, with the interpreter of a virtual environment the wheel was installed into
(``make wheel-check`` does that). It refuses to run on a ``mapo_fast`` imported from a source
checkout, then runs the loss forward and backward, the advantage, a crop and a tiny rollout on
CPU with the native block allocator and decode kernel, asserting that both are the installed
shared objects and that the decode kernel ran. Prints one line per check."""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

import torch


def installed_package() -> Path:
    """The imported package's folder, checked to be the environment's, not a checkout's."""
    import mapo_fast
    where = Path(mapo_fast.__file__).resolve().parent
    site = Path(sysconfig.get_paths()["purelib"]).resolve()
    platsite = Path(sysconfig.get_paths()["platlib"]).resolve()
    if site not in where.parents and platsite not in where.parents:
        raise SystemExit(f"mapo_fast was imported from {where}, not from the installed "
                         f"environment ({site})")
    print(f"mapo_fast {mapo_fast.__version__} from {where}")
    return where


def check_loss() -> None:
    import mapo_fast
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    mask = torch.ones(3, 7)
    mask[1, 4:] = 0
    loss, metrics = mapo_fast.mapo_loss(hidden, weight, ids, torch.randn(3, generator=g), mask)
    loss.backward()
    assert torch.isfinite(loss) and hidden.grad is not None and weight.grad is not None
    assert bool(torch.isfinite(weight.grad).all()) and float(weight.grad.abs().sum()) > 0
    print(f"loss {loss.item():+.5f}, gradients finite (path {metrics.path})")


def check_advantage() -> None:
    import mapo_fast
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 1, 1])
    scores = torch.tensor([[0.9, 0.0], [0.1, 0.5], [0.7, 0.0], [0.2, 0.0]])
    turns = torch.tensor([[True, False], [True, True], [True, False], [True, False]])
    token_turn = torch.tensor([[-1, 0, 0, -1], [0, 1, 1, -1], [-1, 0, -1, -1], [0, 0, -1, -1]])
    adv = mapo_fast.mapo_advantages(rewards, groups, scores, turns, token_turn)
    assert adv.shape == (4, 4) and bool(torch.isfinite(adv).all())
    assert float(adv[0, 0]) > 0 > float(adv[1, 3])  # the rewarded sample of a group is above
    print(f"advantages {tuple(adv.shape)}, group 0's outcome parts {adv[0, 0]:+.3f} "
          f"{adv[1, 3]:+.3f}")


def check_crop() -> None:
    import mapo_fast
    image = torch.randint(0, 256, (3, 120, 160), dtype=torch.uint8)
    crops = mapo_fast.crop_and_zoom([image], [[0, 10, 20, 74, 84]], size=56)
    assert len(crops) == 1 and crops[0].shape == (3, 56, 56) and crops[0].dtype == torch.uint8
    print(f"crop {tuple(crops[0].shape)} {crops[0].dtype}")


def check_rollout(package: Path) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import mapo_fast
    from mapo_fast.kernels import paged_attention_cpu
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=128, hidden_size=128, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=256)
    model = Qwen2ForCausalLM(cfg).eval()
    engine = mapo_fast.RolloutEngine(model, None, block_size=16, num_blocks=32)
    allocator = sys.modules[type(engine.blocks).__module__]
    kernel = paged_attention_cpu.extension()
    for name, module in [("block allocator", allocator), ("decode kernel", kernel)]:
        assert module is not None, f"the native {name} is not loaded"
        path = Path(module.__file__).resolve()
        assert path.parent == package / "kernels" and path.suffix == ".so", (name, path)
        print(f"native {name}: {path.name}")
    calls = []
    decode = kernel.decode

    class Counting:
        """The extension with its decode counted (the module's own attribute is read-only)."""

        def __getattr__(self, name):
            return getattr(kernel, name)

        def decode(self, *args):
            calls.append(args[-1])
            return decode(*args)

    paged_attention_cpu.extension.cache_clear()
    paged_attention_cpu.extension = lambda: Counting()  # type: ignore[assignment]
    trajs = engine.generate([list(range(1, 21))], group_size=2, max_new_tokens=6,
                            temperature=1.0, seed=0)
    assert len(trajs) == 2 and all(len(t.token_ids) == 26 for t in trajs)
    assert calls, "the rollout never ran the native decode kernel"
    print(f"rollout: 2 samples x 6 tokens, the decode kernel ran {len(calls)} times at level "
          f"{paged_attention_cpu.ISAS[calls[0]]} (this CPU: "
          f"{paged_attention_cpu.supported_isas()})")


def main() -> None:
    package = installed_package()
    check_loss()
    check_advantage()
    check_crop()
    check_rollout(package)
    print("wheel smoke test: every check passed")


if __name__ == "__main__":
    main()
