"""The embedded world's tokenizer: a byte-level BPE trained on the generated corpus, cached on disk.

Every embedded task, env id and pipeline run uses this one tokenizer, so a policy trained by `textenv pipeline`
fits the observation and action spaces of `gym.make("textenv/PositiveReview-v0")`. It is rebuilt from code and a
seed (no download); the cache only saves the few seconds that training it takes.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from textenv.chat import EMBEDDED_CHAT_TEMPLATE

# Bump when the corpus or tokenizer recipe changes: old caches are then ignored, never reused by mistake.
TOKENIZER_VERSION = "v1"
CORPUS_SEED = 0
VOCAB_SIZE = 4096


def cache_dir() -> Path:
    """Where textenv caches generated artefacts: $TEXTENV_CACHE, else ~/.cache/textenv."""
    return Path(os.environ.get("TEXTENV_CACHE", Path.home() / ".cache" / "textenv"))


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> PreTrainedTokenizerBase:
    """The embedded tokenizer (PAD id 0, EOS id 1, vocab 4096), trained on first use and then loaded from cache."""
    folder = cache_dir() / f"tokenizer-{TOKENIZER_VERSION}-seed{CORPUS_SEED}-vocab{VOCAB_SIZE}"
    if not (folder / "tokenizer.json").is_file():
        from textenv.data.corpus import generate_corpus
        from textenv.tokenizer import train_tokenizer

        tokenizer = train_tokenizer(generate_corpus(seed=CORPUS_SEED), vocab_size=VOCAB_SIZE)
        folder.parent.mkdir(parents=True, exist_ok=True)
        # Write to a private folder, then rename: concurrent first uses (pytest workers, DDP ranks) never see a
        # half-written tokenizer.
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; its folder is identical
            pass
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = EMBEDDED_CHAT_TEMPLATE  # the multi-turn envs render messages with it (textenv.chat)
    return tokenizer
