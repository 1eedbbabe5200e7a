"""TextGenVectorEnv: N TextGenEnv episodes stepped together with NumPy, one batched reward call per step."""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.error import ResetNeeded
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from rewards.base import call_reward
from textenv.env import text_frame
from textenv.envsetup import check_options, check_prompt_index, make_setup


class TextGenVectorEnv(VectorEnv):
    """`num_envs` copies of `TextGenEnv` (same arguments, same spec), batched natively.

    Given the same seeds and actions it yields exactly what `gymnasium.vector.SyncVectorEnv` over `num_envs`
    `TextGenEnv`s yields (observations, rewards, flags, infos), but does its work on arrays, tokenizes the prompts
    once, and scores all episodes that end on a step with ONE call of the reward function, which is what makes
    a learned reward model affordable.

    `reset(seed=s)` seeds sub-env i with `s + i`, as SyncVectorEnv does; a list of seeds is taken as is.
    `reset(options={"prompt_index": idx})` with an int array of shape (num_envs,) starts sub-env i from prompt
    idx[i] (no draw): K copies of one index give K responses to one prompt.

    Autoreset (`autoreset_mode`, default `AutoresetMode.NEXT_STEP`, Gymnasium's default; see
    https://farama.org/Vector-Autoreset-Mode):
    - NEXT_STEP: a sub-env that ended is reset by the next `step`, which ignores its action and returns its new
      prompt with reward 0 and both flags False.
    - SAME_STEP: a sub-env that ends is reset within the same `step`; its last observation and info are in
      `infos["final_obs"]` and `infos["final_info"]`.
    - DISABLED: nothing is reset automatically: call `reset(options={"reset_mask": mask})`; stepping a sub-env
      whose episode ended raises `gymnasium.error.ResetNeeded`.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4, "autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int = 1,
        task: str | None = None,
        prompts: Any = None,
        tokenizer: Any = None,
        reward_fn: Any = None,
        max_new_tokens: int | None = None,
        max_prompt_tokens: int | None = None,
        truncation_side: str | None = "left",
        vocab_size: int | None = None,
        prompt_column: str = "prompt",
        prompt_format: str = "auto",
        reward_kwargs: dict | None = None,
        trust_remote_code: bool = False,
        render_mode: str | None = None,
        autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP,
    ):
        if isinstance(num_envs, bool) or not isinstance(num_envs, (int, np.integer)) or num_envs < 1:
            raise ValueError(f"num_envs must be a positive int, got {num_envs!r}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        try:
            autoreset_mode = AutoresetMode(autoreset_mode)
        except ValueError:
            raise ValueError(f"autoreset_mode must be one of {[m.value for m in AutoresetMode]}, "
                             f"got {autoreset_mode!r}") from None
        self.autoreset_mode = autoreset_mode
        self.metadata = {**self.metadata, "autoreset_mode": autoreset_mode}
        self.num_envs = int(num_envs)
        self.render_mode = render_mode
        self.setup = s = make_setup(
            task=task,
            prompts=prompts,
            tokenizer=tokenizer,
            reward_fn=reward_fn,
            max_new_tokens=max_new_tokens,
            max_prompt_tokens=max_prompt_tokens,
            truncation_side=truncation_side,
            vocab_size=vocab_size,
            prompt_column=prompt_column,
            prompt_format=prompt_format,
            reward_kwargs=reward_kwargs,
            trust_remote_code=trust_remote_code,
        )
        self.single_observation_space = s.observation_space
        self.single_action_space = s.action_space
        self.observation_space = batch_space(s.observation_space, self.num_envs)
        self.action_space = batch_space(s.action_space, self.num_envs)
        width = s.max_prompt_tokens + s.max_new_tokens
        self._ids = np.full((self.num_envs, width), s.pad_token_id, dtype=np.int64)  # (N, P+T)
        self._mask = np.zeros((self.num_envs, width), dtype=np.int64)  # (N, P+T)
        self._lengths = np.zeros(self.num_envs, dtype=np.int64)  # (N,) response tokens so far
        self._prompt_index = np.full(self.num_envs, -1, dtype=np.int64)  # (N,) -1 until reset
        self._done = np.zeros(self.num_envs, dtype=bool)  # (N,) episode ended, not yet reset
        self._rngs: list[np.random.Generator | None] = [None] * self.num_envs

    def _obs(self) -> dict[str, np.ndarray]:
        return {"input_ids": self._ids.copy(), "attention_mask": self._mask.copy()}

    def _reset_row(self, i: int, prompt_index: int | None = None) -> dict[str, Any]:
        s = self.setup
        if self._rngs[i] is None:
            self._rngs[i], _ = seeding.np_random(None)
        if prompt_index is None:
            prompt_index = int(self._rngs[i].integers(len(s.prompts)))
        self._prompt_index[i] = prompt_index
        self._ids[i] = s.pad_token_id
        self._mask[i] = 0
        self._ids[i, : s.max_prompt_tokens] = s.prompt_ids[self._prompt_index[i]]
        self._mask[i, : s.max_prompt_tokens] = s.prompt_mask[self._prompt_index[i]]
        self._lengths[i] = 0
        self._done[i] = False
        return {"prompt_index": int(self._prompt_index[i])}

    def reset(self, *, seed: int | list[int | None] | None = None, options: dict | None = None):
        options = check_options(options, ("prompt_index", "reset_mask"))
        if isinstance(seed, int):
            super().reset(seed=seed)
            seed = [seed + i for i in range(self.num_envs)]
        elif seed is None:
            seed = [None] * self.num_envs
        if len(seed) != self.num_envs:
            raise ValueError(f"got {len(seed)} seeds for {self.num_envs} envs")
        mask = np.ones(self.num_envs, dtype=bool)
        if "reset_mask" in options:
            mask = np.asarray(options["reset_mask"])
            if mask.shape != (self.num_envs,) or mask.dtype != np.bool_:
                raise ValueError(f"reset_mask must be a bool array of shape ({self.num_envs},), got {mask!r}")
        chosen: list[int | None] = [None] * self.num_envs
        if "prompt_index" in options:
            index = np.asarray(options["prompt_index"])
            if index.shape != (self.num_envs,):
                raise ValueError(f"prompt_index must have shape ({self.num_envs},), got {index.shape}")
            chosen = [check_prompt_index(i, len(self.setup.prompts)) for i in index.tolist()]
        infos: dict[str, Any] = {}
        for i in np.flatnonzero(mask):
            if seed[i] is not None:
                self._rngs[i], _ = seeding.np_random(seed[i])
            infos = self._add_info(infos, self._reset_row(i, chosen[i]), i)
        return self._obs(), infos

    def _check_actions(self, actions: Any) -> np.ndarray:
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},), got {actions.shape}")
        if not np.issubdtype(actions.dtype, np.integer):
            raise TypeError(f"actions must be integer token ids, got dtype {actions.dtype}")
        bad = np.flatnonzero((actions < 0) | (actions >= self.setup.vocab_size))
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"action {int(actions[i])} of env {i} is outside Discrete({self.setup.vocab_size})")
        return actions.astype(np.int64)

    def step(self, actions):
        s = self.setup
        actions = self._check_actions(actions)
        if (self._prompt_index < 0).any():
            raise ResetNeeded("call reset() before step()")
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            resetting = self._done.copy()  # (N,) these ignore their action this step
        elif self._done.any():  # SAME_STEP never leaves a sub-env done; DISABLED leaves it to the user
            raise ResetNeeded(f"envs {np.flatnonzero(self._done).tolist()} ended; "
                              f"reset them with options={{'reset_mask': ...}}")
        else:
            resetting = np.zeros(self.num_envs, dtype=bool)
        stepping = ~resetting  # (N,)
        lengths = self._lengths + stepping  # (N,)
        terminated = stepping & (actions == s.eos_token_id)  # (N,)
        truncated = stepping & ~terminated & (lengths == s.max_new_tokens)  # (N,)
        ended = np.flatnonzero(terminated | truncated)

        rewards = np.zeros(self.num_envs, dtype=np.float64)  # (N,)
        end_info: dict[int, dict[str, Any]] = {}
        if ended.size:
            P = s.max_prompt_tokens
            prompts = [s.prompts[self._prompt_index[i]] for i in ended]
            responses = [
                s.decode_response(np.append(self._ids[i, P : P + self._lengths[i]], actions[i])) for i in ended
            ]
            # One call for every episode that ends now; it raises before any state changes.
            rewards[ended] = call_reward(s.reward_fn, prompts, responses)
            end_info = {int(i): {"prompt": p, "response": r} for i, p, r in zip(ended, prompts, responses)}

        rows = np.flatnonzero(stepping)
        columns = s.max_prompt_tokens + self._lengths[rows]
        self._ids[rows, columns] = actions[rows]
        self._mask[rows, columns] = 1
        self._lengths = lengths
        self._done = terminated | truncated

        infos: dict[str, Any] = {}
        for i in range(self.num_envs):
            if resetting[i]:
                infos = self._add_info(infos, self._reset_row(i), i)
                continue
            info = {"prompt_index": int(self._prompt_index[i]), **end_info.get(i, {})}
            if self.autoreset_mode == AutoresetMode.SAME_STEP and self._done[i]:
                final_obs = {"input_ids": self._ids[i].copy(), "attention_mask": self._mask[i].copy()}
                infos = self._add_info(infos, {"final_obs": final_obs, "final_info": info}, i)
                info = self._reset_row(i)
            infos = self._add_info(infos, info, i)
        return self._obs(), rewards, terminated, truncated, infos

    def render(self) -> tuple[str, ...] | tuple[np.ndarray, ...] | None:
        """One text (render_mode "ansi") or frame ("rgb_array") per sub-env, as `TextGenEnv.render`."""
        if self.render_mode is None:
            return None
        s, P = self.setup, self.setup.max_prompt_tokens
        texts = tuple(
            "" if self._prompt_index[i] < 0
            else f"{s.prompts[self._prompt_index[i]]}\u2502"
                 f"{s.tokenizer.decode(self._ids[i, P : P + self._lengths[i]].tolist())}"
            for i in range(self.num_envs)
        )
        return texts if self.render_mode == "ansi" else tuple(text_frame(t) for t in texts)

    def close_extras(self, **kwargs) -> None:
        """Nothing to release; `close()` is safe to call twice."""
