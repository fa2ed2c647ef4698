"""A reward plugged in from a file (docs/rewards.md): config `reward_modules: [tests/data/plugin_reward.py]`."""
from rlmeta.rewards import register


@register("char_share", "share of the completion's non-space characters that are in `chars` (default: digits)")
def char_share(completion: str, reference=None, prompt=None, *, chars: str = "0123456789") -> float:
    """0 for an empty completion; 1 when every non-space character is one of ``chars``."""
    kept = [c for c in completion or "" if not c.isspace()]
    return sum(c in chars for c in kept) / len(kept) if kept else 0.0
