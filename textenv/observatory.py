"""Gold and proxy kept apart in any textenv env: `ProxyReward` pays a proxy and reports the env's own reward, the
gold, only in `info` (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization", arXiv 2210.10760)."""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from rewards.base import as_reward_fn, call_reward
from textenv.multiturn import MultiTurnEnv


class ProxyReward(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """
    ## Description
    Wraps a `TextGenEnv` or a `MultiTurnEnv` and pays a proxy reward instead of the env's own. What is gold and
    what is proxy:

    - **gold**: the wrapped env's own reward, the objective one truly cares about (an embedded task's gold
      scorer, a multi-turn env's turn logic and its reward_fn). The agent never sees it as reward.
    - **proxy**: `proxy`, any reward textenv takes (a learned reward-model folder or hub id, a callable, a
      `"module:attr"` string, a dict of them to weights): what an RLHF agent is trained on, scored on the
      episode's text at its last step. Single-turn: `proxy([prompt], [response])`; multi-turn: the opening and
      the rest of the stream, special tokens kept (`MultiTurnEnv.transcript`), as a reward model reads them.

    ## Rewards
    0.0 on every step but an episode's last; on the last, the proxy's score.

    ## Info
    The wrapped env's info, plus on every step (the same keys each time, as tianshou's buffers need):
    `gold_reward` (the env's reward this step), `gold_return` and `proxy_return` (this episode's so far; the
    proxy's is 0 until the last step), `episodes` (finished so far), `gold_mean` and `proxy_mean` (the running
    means of the finished episodes' returns, 0.0 before the first) and `gap` (proxy_mean - gold_mean).

    Spaces, starting state, episode end and the env's own arguments are the wrapped env's. Works as is with SB3
    and any Gymnasium-API library.
    """

    def __init__(self, env: gym.Env, proxy: Any, **proxy_kwargs: Any):
        gym.utils.RecordConstructorArgs.__init__(self, proxy=proxy, **proxy_kwargs)  # so gym.make can rebuild it
        gym.Wrapper.__init__(self, env)
        self.proxy = as_reward_fn(proxy, **proxy_kwargs)
        self.episodes, self._gold_total, self._proxy_total = 0, 0.0, 0.0
        self._gold_return = 0.0

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._gold_return = 0.0
        return obs, {**info, **self._stats(0.0, 0.0)}

    def step(self, action):
        obs, gold, terminated, truncated, info = self.env.step(action)
        self._gold_return += gold
        proxy = 0.0
        if terminated or truncated:
            inner = self.env.unwrapped
            prompt, response = inner.transcript() if isinstance(inner, MultiTurnEnv) else (info["prompt"],
                                                                                           info["response"])
            proxy = call_reward(self.proxy, [prompt], [response])[0]
            self.episodes += 1
            self._gold_total += self._gold_return
            self._proxy_total += proxy
        return obs, proxy, terminated, truncated, {**info, **self._stats(gold, proxy)}

    def _stats(self, gold: float, proxy: float) -> dict[str, float]:
        n = max(self.episodes, 1)
        gold_mean, proxy_mean = self._gold_total / n, self._proxy_total / n
        return {"gold_reward": float(gold), "gold_return": self._gold_return, "proxy_return": float(proxy),
                "episodes": self.episodes, "gold_mean": gold_mean, "proxy_mean": proxy_mean,
                "gap": proxy_mean - gold_mean}
