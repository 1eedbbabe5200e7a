"""The project's tokenizer: a byte-level BPE trained on the generated corpus, saved as a Hugging Face folder.

Any Hugging Face tokenizer works in its place; `load_tokenizer` and `check_special_tokens` are what the rest of
the project uses, so a user's tokenizer goes through the same checks as ours.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE on `texts`, with distinct PAD (id 0) and EOS (id 1) tokens.

    Byte-level means every string round-trips (no unknown token). EOS doubles as BOS, as in GPT-2.
    """
    if vocab_size < 512:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE (needs >= 512)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=None,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def check_special_tokens(tokenizer: PreTrainedTokenizerBase) -> None:
    """Raise ValueError unless the tokenizer has a PAD and an EOS token, and they differ.

    Why distinct: with PAD == EOS, masking padding also masks the EOS the policy emitted, and the model never
    learns to stop (see "The N Implementation Details of RLHF with PPO").
    """
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name!r} has no EOS token; set tokenizer.eos_token before using it")
    if tokenizer.pad_token_id is None:
        raise ValueError(
            f"tokenizer {name!r} has no PAD token; add a distinct one, e.g. "
            f"tokenizer.add_special_tokens({{'pad_token': '{PAD_TOKEN}'}}) and resize the model's embeddings"
        )
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ValueError(
            f"tokenizer {name!r} uses the same id {tokenizer.pad_token_id} for PAD and EOS; "
            "they must differ so that padding is never mistaken for the end of a response"
        )


# what a folder needs for AutoTokenizer: a fast tokenizer's file, or a slow one's config and vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")


def load_tokenizer(
    name_or_path: str | Path | PreTrainedTokenizerBase, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """A tokenizer from a hub id, a local folder, or an already loaded tokenizer (returned as is).

    The special tokens are checked, never added or changed: we do not mutate what the caller handed us.
    """
    if isinstance(name_or_path, PreTrainedTokenizerBase):
        tokenizer = name_or_path
    elif isinstance(name_or_path, (str, Path)):
        from textenv.models.loading import check_source

        source = check_source(name_or_path, "tokenizer")
        if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
            raise ValueError(f"tokenizer {str(name_or_path)!r} is a folder with no tokenizer in it (none of "
                             f"{', '.join(TOKENIZER_FILES)}): give the folder a tokenizer was saved to")
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    else:
        raise TypeError(
            f"tokenizer must be a hub id, a folder path or a PreTrainedTokenizerBase, got {type(name_or_path).__name__}"
        )
    check_special_tokens(tokenizer)
    return tokenizer
