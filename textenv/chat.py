"""Chat templates on an exact token stream: what the multi-turn env appends after each agent turn.

A multi-turn episode's observation is one token stream: the template's rendering of the opening messages and the
generation prompt, then the agent's own tokens (never re-tokenized), then after each agent turn the template's
rendering of the env's reply and the next generation prompt, and so on. `ChatFormat` computes those env chunks
from the tokenizer's own `apply_chat_template`, as text deltas:

    chunk(conversation, reply) = R(conversation + [reply], generation prompt) minus R(conversation),

starting right after the agent's end-of-turn token (what the template writes after it, e.g. ChatML's newline,
belongs to the chunk). Special tokens split a text before BPE, so the chunk tokenizes as it does inside the whole
rendering: when the agent's tokens are the tokenization of its text, the stream equals the template's rendering
of the final conversation, token for token (tests/test_multiturn.py checks the embedded, a ChatML-style and a
Llama-3-style template). A template that rewrites history (some drop earlier turns' reasoning) renders a
conversation that is no extension of the shorter one: the stream keeps what the policy actually saw, and each
chunk is the template's rendering of the new message (from the agent's end-of-turn token on) as it renders the
whole conversation then.
"""

from __future__ import annotations

import numpy as np
from transformers import PreTrainedTokenizerBase

# The embedded tokenizer's template: "role:" and a newline, the content, EOS (the end-of-turn token). The newline
# before the content is a pre-tokenizer boundary, so a turn's content tokenizes as it does on its own.
EMBEDDED_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}<|endoftext|>\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")
PROMPT_FORMATS = ("auto", "text", "chat")


def check_prompt_format(prompt_format: str) -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    return prompt_format


def prompts_through_template(tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> bool:
    """Whether a plain str prompt reaches this tokenizer's model as a user message rendered by its chat template
    (`prompt_format` "chat") or as it is ("text"). "auto": through the template when the tokenizer has one that is
    not textenv's embedded template (an instruct checkpoint's own; the embedded base model writes plain text and its
    template exists for the multi-turn envs). A base model whose tokenizer ships a template (some Qwen base models
    do) takes "text"."""
    check_prompt_format(prompt_format)
    template = getattr(tokenizer, "chat_template", None)
    if prompt_format == "chat" and not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"prompt_format='chat' but tokenizer {name!r} has no chat template: use prompt_format="
                         "'text', or a chat model's tokenizer")
    return prompt_format == "chat" or (prompt_format == "auto" and bool(template)
                                       and template != EMBEDDED_CHAT_TEMPLATE)


def check_message(message, where: str) -> dict:
    """A message as the env keeps it, {"role": str, "content": str}; ValueError naming `where` otherwise."""
    if not isinstance(message, dict) or set(message) - {"role", "content"} or "content" not in message:
        raise ValueError(f"{where}: a message must be a dict {{'role': ..., 'content': str}}, got {message!r}")
    role, content = message.get("role"), message["content"]
    if role not in ROLES:
        raise ValueError(f"{where}: role {role!r} is not one of {ROLES}")
    if not isinstance(content, str):
        raise ValueError(f"{where}: content must be a str, got {type(content).__name__}: {content!r}")
    return {"role": role, "content": content}


class ChatFormat:
    """A tokenizer's chat template as token chunks: `opening(messages)` and `reply(conversation, message)`."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, end_of_turn: int | None = None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {name!r} has no chat template: set tokenizer.chat_template (a Jinja string; "
                             "textenv.chat.EMBEDDED_CHAT_TEMPLATE is a small one) or use a chat model's tokenizer")
        self.tokenizer = tokenizer
        if end_of_turn is not None and (isinstance(end_of_turn, bool) or not isinstance(end_of_turn, (int, np.integer))
                                        or not 0 <= end_of_turn < len(tokenizer)):
            raise ValueError(f"end_of_turn must be a token id in [0, {len(tokenizer)}), got {end_of_turn!r}")
        self.end_of_turn = self._end_of_turn(name) if end_of_turn is None else int(end_of_turn)
        self.end_of_turn_text = tokenizer.decode([self.end_of_turn])

    def _end_of_turn(self, name: str) -> int:
        """The first token the template writes after an assistant's content, if it is a special token; else EOS."""
        probe = "\u2023probe\u2023"
        text = self.render([{"role": "user", "content": "u"}, {"role": "assistant", "content": probe}], False)
        after = self.encode(text[text.rindex(probe) + len(probe) :])
        special = set(self.tokenizer.all_special_ids)
        if after and after[0] in special:
            return after[0]
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {name!r}: its template ends a turn with no special token and it has no EOS")
        return self.tokenizer.eos_token_id

    def render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def opening(self, messages: list[dict]) -> list[int]:
        """The tokens of the opening messages and the first generation prompt."""
        return self.encode(self.render(messages, True))

    def reply(self, conversation: list[dict], message: dict) -> list[int]:
        """The tokens the env appends after the agent's end-of-turn token: the rest of the template's closing of
        that turn, `message`, and the next generation prompt. `conversation` ends with the agent's turn.

        The template's rendering of the conversation with `message` holds the agent's end-of-turn token and then
        one more, which closes `message`; the chunk is what follows the first of those two, so it does not depend
        on how the template rendered the history before it."""
        eot = self.end_of_turn_text
        if eot in message["content"]:
            raise ValueError(f"an env message may not contain the end-of-turn token {eot!r}: {message!r}")
        after = self.render([*conversation, message], True)
        last = after.rfind(eot)  # closes `message`
        agent = after.rfind(eot, 0, last) if last > 0 else -1  # closes the agent's turn
        if agent < 0:
            raise ValueError(f"the chat template does not close each turn with {eot!r} (the end-of-turn token); "
                             "pass end_of_turn= the token it closes turns with")
        return self.encode(after[agent + len(eot) :])

    def stream(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """(token ids, agent mask) of a whole conversation as the multi-turn env builds it: the opening (the messages
        before the first assistant turn) with the generation prompt, then each assistant turn's content tokens and
        the end-of-turn token (agent mask 1), each env reply as `reply` renders it (0). What SFT trains on: the
        stream a policy would have produced by emitting exactly those turns."""
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
        if first is None or first == 0:
            raise ValueError("a conversation needs opening messages (system/user) and then an assistant turn; got "
                             f"roles {[m['role'] for m in messages]}")
        ids = self.opening(messages[:first])
        agent = [0] * len(ids)
        for i in range(first, len(messages)):
            message = messages[i]
            if message["role"] == "assistant":
                if i > first and messages[i - 1]["role"] == "assistant":
                    raise ValueError(f"message {i}: two assistant turns in a row; the env answers every agent turn")
                turn = self.encode(message["content"]) + [self.end_of_turn]
                ids, agent = ids + turn, agent + [1] * len(turn)
            else:
                if messages[i - 1]["role"] != "assistant":
                    raise ValueError(f"message {i} ({message['role']}): after the opening, env messages answer an "
                                     "assistant turn, one each")
                chunk = self.reply(messages[:i], message)
                ids, agent = ids + chunk, agent + [0] * len(chunk)
        return ids, agent
