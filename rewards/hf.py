"""Hugging Face sequence classifiers as rewards: any `AutoModelForSequenceClassification` folder or hub id,
our learned reward models included (they are such folders).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from textenv.models import load_sequence_classifier
from textenv.models.lean import lean_forward
from textenv.models.tokens import pad_rows

# A forked child of a process whose torch has run multi-threaded deadlocks in its first multi-threaded op (the
# OpenMP pool does not survive fork: https://github.com/pytorch/pytorch/issues/17199). Gymnasium's AsyncVectorEnv
# forks by default on Linux, so a learned reward scored in the parent first (a single env, a first rollout) hung
# every worker at its first score. A forked child scores on one thread, as PyTorch's own DataLoader workers run.
os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))


def reward_shift(config) -> float:
    """The constant a reward model's score gets on top of its head's output: what `fold_normalization`
    (agents/reward_model.py) could not fold into weights (a bias-free head after an RMSNorm, the Llama family) and
    so kept in the config. 0 for every other model."""
    return float(getattr(config, "reward_shift", 0.0))


def reward_model_text(prompt: str, completion: str) -> str:
    """What a reward model reads: the prompt followed by the completion. Training and scoring both use this."""
    return prompt + completion


class SequenceClassifierReward:
    """Score (prompt, completion) pairs with a sequence-classification model.

    The score is the logit of `label` (an index or a name from ``config.id2label``); a single-logit model (a
    reward model) needs no label. A model with several labels and no `label` is an error that lists the labels,
    since guessing "positive" would silently reward the wrong thing. Sequences are truncated on the left, so the
    completion is always seen.
    """

    def __init__(
        self,
        model: str | Path | PreTrainedModel,
        tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
        *,
        label: int | str | None = None,
        batch_size: int = 64,
        max_length: int | None = None,
        device: str | torch.device | None = None,
        trust_remote_code: bool = False,
    ):
        owned = not isinstance(model, PreTrainedModel)
        if owned:
            self.model = load_sequence_classifier(model, trust_remote_code=trust_remote_code).requires_grad_(False)
            self.name = str(model)
        else:
            self.model = model
            self.name = model.config.name_or_path or type(model).__name__
        if tokenizer is None:
            tokenizer = self.model.config.name_or_path
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=trust_remote_code)
        if tokenizer.pad_token_id is None:
            raise ValueError(f"reward model {self.name!r}: its tokenizer has no PAD token, needed to batch inputs")
        self.tokenizer = tokenizer
        self.model.eval()
        if device is not None:
            self.model.to(device)
        self.device = next(self.model.parameters()).device
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.max_length = max_length or min(tokenizer.model_max_length, self.model.config.max_position_embeddings)
        self.label_index = self._resolve_label(label)
        # A GPT-2 or Llama-family model scores through the lean forward, which computes only the scored token in
        # its last block (textenv/models/lean.py; `_lean`).
        self._frozen = owned
        self._left = None  # the tokenizer's left-truncating copy, made for the first over-long input
        self._packed = None  # built on the first call; a cache, so it is dropped on pickling (see __getstate__)

    def _resolve_label(self, label: int | str | None) -> int:
        num_labels = self.model.config.num_labels
        id2label = self.model.config.id2label
        if label is None:
            if num_labels == 1:
                return 0
            raise ValueError(
                f"reward model {self.name!r} has {num_labels} labels {id2label}; "
                "pass label= to choose the one to reward"
            )
        if isinstance(label, str):
            matches = [i for i, name in id2label.items() if name == label]
            if not matches:
                raise ValueError(f"label {label!r} is not one of {self.name!r}'s labels {list(id2label.values())}")
            return int(matches[0])
        if not 0 <= label < num_labels:
            raise ValueError(f"label index {label} is out of range for {self.name!r} with {num_labels} labels")
        return label

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], **kwargs) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        texts = [reward_model_text(p, c) for p, c in zip(prompts, completions)]
        # a scalar model's shift that its weights could not carry, read at each call (a model handed in may be
        # normalised after this adapter was made)
        shift = reward_shift(self.model.config) if self.model.config.num_labels == 1 else 0.0
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start : start + self.batch_size]
            ids = self.tokenizer(chunk)["input_ids"]
            ids = [row if len(row) <= self.max_length else self._keep_end(text) for row, text in zip(ids, chunk)]
            # the score is read at the last token
            input_ids, attention_mask = pad_rows(ids, self.tokenizer.pad_token_id)
            batch = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device)}
            lean = self._lean()
            logits = self.model(**batch).logits if lean is None else lean.scores(**batch)  # (B, num_labels)
            scores.extend((logits[:, self.label_index].float() + shift).tolist())
        return scores

    def _keep_end(self, text: str) -> list[int]:
        """An over-long input cut to its last tokens (the completion is always seen) with the model's special tokens
        kept: BERT's [CLS] ... [SEP] stay, so the classifier reads the input it was trained on. The caller's
        tokenizer (its truncation_side) is not touched."""
        if self._left is None:  # a private copy that truncates on the left
            self._left = copy.deepcopy(self.tokenizer)
            self._left.truncation_side = "left"
        return self._left(text, truncation=True, max_length=self.max_length)["input_ids"]

    def _lean(self):
        """The lean forward to score through (None: the HF forward). A model this adapter loaded is frozen, so its
        weights are packed once, for rows of ~64 tokens; a model handed in may still be trained by its owner, so its
        live weights are read at every call."""
        if not self._frozen:
            return lean_forward(self.model)
        if self._packed is None:  # None again for a model that is not a plain GPT-2: a type check per call
            self._packed = lean_forward(self.model, pack_rows=self.batch_size * 64)
        return self._packed

    def __getstate__(self) -> dict:
        # oneDNN's packed weights have no storage to pickle (an async vector env, deepcopy, a worker process): they
        # are a cache of the model's weights, rebuilt on the copy's first call
        return {**self.__dict__, "_packed": None}

    def __repr__(self) -> str:
        return f"SequenceClassifierReward({self.name!r}, label={self.label_index})"
