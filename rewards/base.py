"""The reward protocol and its checks.

A reward is any callable ``fn(prompts: list[str], completions: list[str], **kwargs) -> list[float]`` that scores
a batch of (prompt, completion) pairs, as in TRL's ``rewards/``. Plain functions, ``"module:attr"`` import
strings, Hugging Face classifiers and our learned reward models all become such a callable through
`as_reward_fn`, and every call goes through `call_reward`, which turns a misbehaving reward into a clear error.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]: ...


class RewardError(ValueError):
    """A reward function raised, or returned something other than one finite number per completion."""


_IMPORT_STRING = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def reward_name(fn: Callable) -> str:
    """A readable name for error messages: the function's qualified name, or its class name."""
    name = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    return f"{module}.{name}" if module and module != "builtins" else name


def call_reward(fn: Callable, prompts: Sequence[str], completions: Sequence[str], **kwargs: Any) -> list[float]:
    """Call `fn` on a batch and check its answer: one finite real number per completion, as Python floats.

    Raises RewardError naming the reward and the offending index; the caller's state is untouched, so an env
    that calls this before committing its step stays usable.
    """
    name = reward_name(fn)
    try:
        out = fn(list(prompts), list(completions), **kwargs)
    except Exception as exc:  # re-raised with the reward's name; the original is chained
        raise RewardError(f"reward {name!r} raised {type(exc).__name__}: {exc}") from exc
    try:
        out = list(out)
    except TypeError:
        raise RewardError(f"reward {name!r} returned {type(out).__name__}, expected a list of floats") from None
    if len(out) != len(completions):
        raise RewardError(f"reward {name!r} returned {len(out)} scores for {len(completions)} completions")
    scores = []
    for i, value in enumerate(out):
        # numbers.Real admits float, int, np.float32/64 and 0-d tensors' .item(); bool is excluded on purpose.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardError(f"reward {name!r} returned {value!r} ({type(value).__name__}) at index {i}, "
                              "expected a number")
        try:
            value = float(value)
        except OverflowError:  # an int past float's range, e.g. 10**400
            raise RewardError(f"reward {name!r} returned an int of {len(str(abs(value)))} digits at index {i}, beyond "
                              "a float's range") from None
        if not math.isfinite(value):
            raise RewardError(f"reward {name!r} returned {value} at index {i}; scores must be finite")
        scores.append(value)
    return scores


def import_string(spec: str) -> Any:
    """Resolve ``"package.module:attr.sub"`` to the object it names (ValueError naming the spec if it can't)."""
    if not _IMPORT_STRING.match(spec):
        raise ValueError(f"{spec!r} is not an import string of the form 'package.module:attr'")
    module_name, attr_path = spec.split(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import module {module_name!r} from reward spec {spec!r}: {exc}") from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no attribute {attr_path!r} (reward spec {spec!r})") from None
    return obj


def as_reward_fn(spec: Any, **model_kwargs: Any) -> RewardFn:
    """Turn a reward spec into a batched reward callable.

    - a callable: returned as is;
    - ``"module:attr"``: imported (this keeps registered env kwargs JSON-able); a class is not instantiated;
    - a local folder or hub id of a sequence-classification model (an HF classifier or our learned reward
      model): wrapped in `rewards.hf.SequenceClassifierReward`, which takes `model_kwargs` (``label``,
      ``batch_size``, ``device``, ``trust_remote_code``...);
    - a dict ``{spec: weight, ...}``: their `WeightedSum`.
    """
    if isinstance(spec, dict):
        return WeightedSum([(as_reward_fn(s, **model_kwargs), w) for s, w in spec.items()])
    if isinstance(spec, Path):
        spec = str(spec)
    if isinstance(spec, str):
        if not Path(spec).is_dir() and _IMPORT_STRING.match(spec):
            fn = import_string(spec)
            if not callable(fn):
                raise TypeError(f"reward spec {spec!r} names a {type(fn).__name__}, which is not callable")
            return fn
        _check_dotted(spec)
        if Path(spec).is_dir() and not (Path(spec) / "config.json").is_file():
            raise ValueError(f"reward {spec!r} is a folder but not a model folder (no config.json): give a "
                             "sequence-classification model's save_pretrained folder")
        from rewards.hf import SequenceClassifierReward  # torch/transformers only when a model is asked for

        return SequenceClassifierReward(spec, **model_kwargs)
    if callable(spec):
        return spec
    raise TypeError(
        f"reward must be a callable, a 'module:attr' string, a model folder or hub id, or a dict of them; "
        f"got {spec!r} ({type(spec).__name__})"
    )


def _check_dotted(spec: str) -> None:
    """'package.module.attr' (a dot for the colon) names an importable module's attribute: refuse it, suggesting
    the import string, instead of sending it to the hub as a model id."""
    if Path(spec).exists() or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", spec):
        return
    module, attr = spec.rsplit(".", 1)
    try:
        found = hasattr(importlib.import_module(module), attr)
    except ImportError:
        return
    if found:
        raise ValueError(f"reward {spec!r} is neither a model folder nor an import string; did you mean "
                         f"'{module}:{attr}'?")


class WeightedSum:
    """sum_i w_i * r_i(prompts, completions): combine rewards, e.g. a learned RM plus a length penalty."""

    def __init__(self, terms: Sequence[tuple[Callable, float]]):
        if not terms:
            raise ValueError("WeightedSum needs at least one (reward, weight) term")
        for fn, weight in terms:
            if not callable(fn):
                raise TypeError(f"WeightedSum term {fn!r} is not callable")
            if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
                raise ValueError(f"WeightedSum weight {weight!r} for {reward_name(fn)!r} must be a finite number")
        self.terms = [(fn, float(w)) for fn, w in terms]

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        total = [0.0] * len(completions)
        for fn, weight in self.terms:
            for i, score in enumerate(call_reward(fn, prompts, completions, **kwargs)):
                total[i] += weight * score
        return total

    def __repr__(self) -> str:
        return "WeightedSum(" + ", ".join(f"{w} * {reward_name(fn)}" for fn, w in self.terms) + ")"
