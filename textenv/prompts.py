"""Prompt sources for the text environments, and their tokenization into a fixed-width observation.

A source is one of: a list of prompts; a local ``.jsonl``/``.csv``/``.parquet`` file (column ``prompt`` unless
told otherwise) or ``.txt`` file (one prompt per line); a ``datasets.Dataset``; a hub data set id (when online);
or an embedded task (`textenv.tasks.Task`), whose train prompts are used.

A prompt is a str (the policy continues it) or a message list ``[{"role": ..., "content": ...}, ...]`` (a chat
prompt, e.g. a .jsonl column of lists), which `render_prompts` renders through the tokenizer's chat template with
the generation prompt; the policy's reply then ends with the template's end-of-turn token. An instruct checkpoint
(a tokenizer with its own chat template) gets its str prompts the same way, as user messages (`prompt_format`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

TRUNCATION_SIDES = ("left", "right", None)
PROMPT_SUFFIXES = (".jsonl", ".csv", ".parquet", ".txt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "namespace/name"


def _check_prompt_string(source: str) -> None:
    """A str that is neither a prompt file nor a plausible hub id is refused, naming the fix."""
    path = Path(source).expanduser()
    suffixes = ", ".join(PROMPT_SUFFIXES)
    if path.is_dir():
        raise ValueError(f"prompts={source!r} is a folder; give a {suffixes} file, or a list of prompts")
    if path.is_file() or path.suffix in (".json", ".tsv", ".xlsx", ".arrow", ".gz", ".zip"):
        raise ValueError(f"prompts={source!r}: a prompt file must end in one of {suffixes} "
                         "(.jsonl: one JSON object per line)")
    if not _HUB_ID.match(source):
        raise ValueError(f"prompts={source!r} is neither a prompt file ({', '.join(PROMPT_SUFFIXES)}) nor a hub data "
                         f"set id; a single prompt must be given as a list: prompts=[{source!r}]")


def load_prompts(source: Any, *, column: str = "prompt", split: str = "train") -> list[str | list[dict]]:
    """The prompts of `source`: each a str or a message list (ValueError if there are none, TypeError on any other
    entry)."""
    from textenv.tasks import Task  # imported here: textenv.tasks imports the corpus, which is heavier

    if isinstance(source, Task):
        prompts = source.prompts(split)
    elif isinstance(source, (str, Path)) and Path(source).suffix in (".jsonl", ".csv", ".parquet", ".txt"):
        prompts = _prompts_from_file(Path(source), column)
    elif isinstance(source, (list, tuple)):
        prompts = list(source)
    elif isinstance(source, str):
        _check_prompt_string(source)
        import datasets  # a hub id: needs the network, so import only then

        prompts = datasets.load_dataset(source, split=split)[column]
    elif type(source).__module__.startswith("datasets"):
        if column not in source.column_names:
            raise ValueError(f"data set has no column {column!r}; its columns are {source.column_names}")
        prompts = list(source[column])
    else:
        raise TypeError(
            "prompts must be a list of str, a .jsonl/.csv/.parquet/.txt path, a datasets.Dataset, a hub id or a "
            f"Task; got {type(source).__name__}"
        )
    if len(prompts) == 0:
        raise ValueError(f"the prompt source {source if isinstance(source, (str, Path)) else type(source).__name__!r} "
                         "holds no prompts")
    where = f"{str(source)!r}: " if isinstance(source, (str, Path)) else ""
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, (str, list, tuple)):
            raise TypeError(f"{where}prompts[{i}] is a {type(prompt).__name__} ({prompt!r}), expected a str or a "
                            "list of messages")
    return prompts


def render_prompts(prompts: list, tokenizer: PreTrainedTokenizerBase,
                   prompt_format: str = "auto") -> tuple[list[str], int | None]:
    """(the prompts' texts, the end-of-turn token id). Message lists are rendered through the tokenizer's chat
    template with the generation prompt, and the episode ends at the template's end-of-turn token
    (`textenv.chat.ChatFormat`). A str prompt is a user message rendered the same way when `prompt_format` says the
    model is prompted through its template (`textenv.chat.prompts_through_template`: "auto" does for an instruct
    checkpoint's tokenizer), else the text as it is (None: the episode ends at EOS). One env takes one kind of
    prompt: a mix of str and message lists is refused."""
    from textenv.chat import ChatFormat, check_message, prompts_through_template

    chats = [not isinstance(p, str) for p in prompts]
    if not any(chats):
        if not prompts_through_template(tokenizer, prompt_format):
            return list(prompts), None
        prompts, chats = [[{"role": "user", "content": p}] for p in prompts], [True] * len(prompts)
    elif prompt_format == "text":
        i = chats.index(True)
        raise ValueError(f"prompts[{i}] is a message list, which only a chat template renders, but prompt_format="
                         "'text': use 'auto' or 'chat', or give str prompts")
    if not all(chats):
        i = chats.index(False)
        raise TypeError(f"prompts[{i}] is a str ({prompts[i]!r}) among message lists: give every prompt as a message "
                        "list, or every one as a str")
    chat = ChatFormat(tokenizer)
    texts = []
    for i, messages in enumerate(prompts):
        if not messages:
            raise ValueError(f"prompts[{i}] is an empty message list")
        checked = [check_message(m, f"prompts[{i}], message {j}") for j, m in enumerate(messages)]
        if checked[-1]["role"] == "assistant":
            raise ValueError(f"prompts[{i}] ends with an assistant message; a chat prompt ends where the policy "
                             "answers (a system/user/tool message)")
        texts.append(chat.render(checked, True))
    return texts, chat.end_of_turn


def render_unrendered(prompts: list[str], tokenizer: PreTrainedTokenizerBase,
                      prompt_format: str = "auto") -> tuple[list[str], int | None]:
    """`render_prompts` for str prompts some of which may be rendered already: textenv's own comparisons were sampled
    through the env, so each prompt there is the template's rendering, ending with its generation prompt; such a
    prompt is kept as it is, and every other is rendered as `render_prompts` renders it. Where `prompt_format` keeps
    plain text, every prompt is kept (None: responses end at EOS)."""
    from textenv.chat import ChatFormat, prompts_through_template

    if not prompts_through_template(tokenizer, prompt_format):
        return list(prompts), None
    chat = ChatFormat(tokenizer)
    user = [{"role": "user", "content": "\u2023"}]
    closed, opened = chat.render(user, False), chat.render(user, True)
    generation_prompt = opened[len(os.path.commonprefix([closed, opened])) :]  # e.g. ChatML's "<|im_start|>assistant\n"
    todo = [i for i, p in enumerate(prompts) if not (generation_prompt and p.endswith(generation_prompt))]
    texts = list(prompts)
    for i, text in zip(todo, render_prompts([prompts[i] for i in todo], tokenizer, prompt_format)[0] if todo else []):
        texts[i] = text
    return texts, chat.end_of_turn


def fitted_budget(texts: list[str], tokenizer: PreTrainedTokenizerBase, default: int, templated: bool) -> int:
    """A default prompt budget: `default`, grown to the longest of `texts` in tokens when they are str prompts an
    instruct template wrapped, so that left truncation never cuts the template's own tokens (a system prompt,
    headers)."""
    if not templated:
        return default
    return max(default, max(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]))


def _prompts_from_file(path: Path, column: str) -> list[str]:
    if not path.is_file():
        raise ValueError(f"prompt file {str(path)!r} does not exist")
    if path.suffix == ".txt":
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"prompt file {str(path)!r} is not UTF-8 text ({exc.reason}); re-save it as "
                             "UTF-8") from None
        return [line for line in text.splitlines() if line.strip()]
    from textenv.records import read_records

    records = read_records(path)
    if records and column not in records[0]:
        raise ValueError(f"prompt file {str(path)!r} has no column {column!r}; its columns are {sorted(records[0])}")
    return [r[column] for r in records]


def tokenize_prompts(
    prompts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    max_prompt_tokens: int,
    truncation_side: str | None = "left",
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad every prompt to `max_prompt_tokens` ids: returns (ids, mask), both int64 (N, max_prompt_tokens).

    Left padding puts every prompt's last token in the same column, so that response token t always sits at
    column max_prompt_tokens + t. An over-long prompt keeps its last tokens (``truncation_side="left"``, the
    default: the end of a prompt is what the response continues), its first tokens (``"right"``), or is an
    error (``None``). A prompt with no tokens is an error: the policy would condition on nothing.
    """
    if truncation_side not in TRUNCATION_SIDES:
        raise ValueError(f"truncation_side must be one of {TRUNCATION_SIDES}, got {truncation_side!r}")
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    ids = np.full((len(prompts), max_prompt_tokens), tokenizer.pad_token_id, dtype=np.int64)  # (N, P)
    mask = np.zeros((len(prompts), max_prompt_tokens), dtype=np.int64)  # (N, P)
    for i, row in enumerate(encoded):
        if len(row) == 0:
            raise ValueError(f"prompts[{i}] ({prompts[i]!r}) has no tokens: drop it or give it some text")
        if len(row) > max_prompt_tokens:
            if truncation_side is None:
                raise ValueError(
                    f"prompt {i} has {len(row)} tokens, more than max_prompt_tokens={max_prompt_tokens} "
                    "(pass truncation_side='left' or 'right' to truncate instead)"
                )
            row = row[-max_prompt_tokens:] if truncation_side == "left" else row[:max_prompt_tokens]
        ids[i, max_prompt_tokens - len(row) :] = row
        mask[i, max_prompt_tokens - len(row) :] = 1
    return ids, mask
