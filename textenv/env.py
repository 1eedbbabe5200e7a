"""TextGenEnv: text generation as a Gymnasium environment, one token per action, one response per episode."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.error import ResetNeeded

from rewards.base import call_reward
from textenv.envsetup import check_action, check_options, check_prompt_index, make_setup


class TextGenEnv(gym.Env):
    """
    ## Description
    An episode is one response to one prompt. Each step the agent emits one token (the action), which is
    appended to the response; the episode ends when the agent emits EOS (the end-of-turn token, for chat prompts)
    or the response reaches `max_new_tokens`. The reward is a reward function's score of the (prompt, response)
    pair, paid at the last step, as in RLHF (Ziegler et al. 2019, arXiv 1909.08593; Ouyang et al. 2022, arXiv
    2203.02155). The env never sees a policy: a KL penalty to a reference policy is the agent's business.

    ## Action Space
    `Discrete(V)`: the token id to append, with V = `vocab_size` (default: the tokenizer's length; pass the
    model's logits width when it is larger). Any id is accepted, PAD included (it is then a real response
    token); EOS ends the episode and is not part of the decoded response.

    ## Observation Space
    `Dict(input_ids=Box(0, V-1, (P+T,), int64), attention_mask=Box(0, 1, (P+T,), int64))` with
    P = `max_prompt_tokens` and T = `max_new_tokens`. The prompt is left-padded into columns [0, P), so response
    token t always sits in column P+t; unfilled columns hold PAD with mask 0. Position ids for a model are
    `cumsum(attention_mask) - 1`. A chat prompt (a message list) is its rendering through the tokenizer's chat
    template, generation prompt included (`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`),
    token for token.

    ## Rewards
    0.0 on every step but the last; on the last, `reward_fn([prompt], [response])[0]`, where `response` is the
    decoded text of the response tokens without special tokens and `prompt` the prompt's text as the policy saw
    it (a chat prompt rendered by the template). A reward that raises or returns anything but one
    finite number raises `rewards.RewardError`, and the env is left as it was before that step.

    ## Starting State
    `reset()` draws a prompt uniformly from the prompt source with `self.np_random`;
    `reset(options={"prompt_index": i})` starts from prompt i instead (no draw), e.g. to sample several
    responses to one prompt (comparisons, GRPO groups) or to evaluate a fixed prompt set.

    ## Episode End
    - Termination: the action is the EOS token; with chat prompts, the template's end-of-turn token (ChatML's
      `<|im_end|>`, Llama 3's `<|eot_id|>`; EOS where the template closes turns with it, as the embedded one does).
    - Truncation: the response holds `max_new_tokens` tokens without EOS.
    Stepping before `reset()` or after the episode ended raises `gymnasium.error.ResetNeeded`.

    ## Info
    `reset` and every step return `{"prompt_index": int}`; the last step adds `"prompt"` and `"response"` (str).

    ## Arguments
    - `task`: name of an embedded task (`textenv.tasks.TASKS`); it supplies defaults for everything below.
    - `prompts`: list of prompts, a `.jsonl`/`.csv`/`.parquet`/`.txt` path, a `datasets.Dataset` or hub id, a Task.
      A prompt is a str, or a message list `[{"role": ..., "content": ...}, ...]` (a chat prompt: the tokenizer
      needs a chat template; one env takes one kind).
    - `prompt_format` ("auto"): how a str prompt reaches the model. "chat": as a user message rendered by the
      tokenizer's chat template, the episode ending at its end-of-turn token, like a message list; "text": as it
      is; "auto": "chat" for an instruct checkpoint, i.e. a tokenizer with a chat template other than textenv's
      embedded one (`textenv.chat.prompts_through_template`). Message lists always go through the template.
    - `tokenizer`: a hub id, a folder, or a loaded tokenizer; it must have distinct PAD and EOS tokens (it is
      checked, never modified).
    - `reward_fn`: a callable `(prompts, completions, **kw) -> list[float]`, a `"module:attr"` string, a
      sequence-classification model folder or hub id (ours or any HF classifier), or a dict of them to weights.
    - `max_new_tokens` (48), `max_prompt_tokens` (64): the response and prompt budgets in tokens.
    - `truncation_side` ("left"): an over-long prompt keeps its last tokens ("left"), its first ("right"), or
      is an error at construction (None).
    - `vocab_size`, `prompt_column` ("prompt"), `reward_kwargs` (passed to the reward model adapter, e.g.
      `{"label": "POSITIVE"}`), `trust_remote_code` (False), `render_mode` (None, "ansi": the text "prompt│response",
      or "rgb_array": that text drawn on a fixed 160 x 480 RGB frame, for video recorders and SB3's `make_vec_env`,
      which asks for it).

    ## Version History
    - v1 (`textenv/TextGen-v1`): `prompt_format="auto"`, so an instruct checkpoint's tokenizer gets str prompts
      through its chat template. The class's default.
    - v0: initial release; chat prompts (message lists) added without changing str prompts' episodes.
      `textenv/TextGen-v0` pins `prompt_format="text"`: str prompts as they are, whatever the tokenizer. The
      embedded task ids take "auto", which leaves their default tokenizer (the embedded one) in plain text as
      before; only an instruct tokenizer passed to them changes their episodes.
    """

    metadata = {"render_modes": ["ansi", "rgb_array"], "render_fps": 4}

    def __init__(
        self,
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
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        self.render_mode = render_mode
        self.setup = make_setup(
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
        self.observation_space = self.setup.observation_space
        self.action_space = self.setup.action_space
        width = self.setup.max_prompt_tokens + self.setup.max_new_tokens
        self._ids = np.full(width, self.setup.pad_token_id, dtype=np.int64)  # (P+T,)
        self._mask = np.zeros(width, dtype=np.int64)  # (P+T,)
        self._prompt_index: int | None = None  # None until the first reset
        self._length = 0  # response tokens so far
        self._done = False

    def _obs(self) -> dict[str, np.ndarray]:
        return {"input_ids": self._ids.copy(), "attention_mask": self._mask.copy()}

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        options = check_options(options, ("prompt_index",))
        super().reset(seed=seed)
        s = self.setup
        if "prompt_index" in options:
            self._prompt_index = check_prompt_index(options["prompt_index"], len(s.prompts))
        else:
            self._prompt_index = int(self.np_random.integers(len(s.prompts)))
        self._ids[:] = s.pad_token_id
        self._mask[:] = 0
        self._ids[: s.max_prompt_tokens] = s.prompt_ids[self._prompt_index]
        self._mask[: s.max_prompt_tokens] = s.prompt_mask[self._prompt_index]
        self._length = 0
        self._done = False
        return self._obs(), {"prompt_index": self._prompt_index}

    def step(self, action):
        if self._prompt_index is None:
            raise ResetNeeded("call reset() before step()")
        if self._done:
            raise ResetNeeded("the episode has ended (terminated or truncated); call reset() before step()")
        s = self.setup
        token = check_action(action, s.vocab_size)
        length = self._length + 1
        terminated = token == s.eos_token_id
        truncated = not terminated and length == s.max_new_tokens
        reward = 0.0
        info: dict[str, Any] = {"prompt_index": self._prompt_index}
        if terminated or truncated:
            start = s.max_prompt_tokens
            response_ids = np.append(self._ids[start : start + self._length], token)
            prompt, response = s.prompts[self._prompt_index], s.decode_response(response_ids)
            reward = call_reward(s.reward_fn, [prompt], [response])[0]  # raises before any state changes
            info.update(prompt=prompt, response=response)
        column = s.max_prompt_tokens + self._length
        self._ids[column] = token
        self._mask[column] = 1
        self._length = length
        self._done = terminated or truncated
        return self._obs(), reward, bool(terminated), bool(truncated), info

    def render(self) -> str | np.ndarray | None:
        if self.render_mode is None:
            gym.logger.warn("render() called without a render_mode; pass render_mode='ansi' to the env")
            return None
        text = ""
        if self._prompt_index is not None:
            s = self.setup
            start = s.max_prompt_tokens
            response = s.tokenizer.decode(self._ids[start : start + self._length].tolist())
            text = f"{s.prompts[self._prompt_index]}\u2502{response}"
        return text if self.render_mode == "ansi" else text_frame(text)

    def close(self) -> None:
        """Nothing to release: the reward function owns its resources. Safe to call any number of times."""


def text_frame(text: str, height: int = 160, width: int = 480) -> np.ndarray:
    """`text` drawn in black on a white (height, width, 3) uint8 frame, wrapped, cut to what fits.

    The frame size is fixed so that a video of an episode has one shape throughout.
    """
    import textwrap

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    line_height, chars = 12, width // 6  # PIL's default bitmap font: about 6 x 11 pixels a character
    lines = [line for part in text.splitlines() or [""] for line in textwrap.wrap(part, chars) or [""]]
    for i, line in enumerate(lines[: (height - 8) // line_height]):
        draw.text((4, 4 + i * line_height), line, fill="black")
    return np.asarray(image, dtype=np.uint8)
