"""Turn reward specs from the command line (or a config file) into reward functions."""

from __future__ import annotations

import ast
import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError
from posttrain.rewards.builtin import BUILTIN_FACTORIES, BUILTIN_REWARDS

SPEC_FORMS = (
    "a built-in name ({builtins})",
    "a built-in with settings, e.g. 'length_penalty(target=128, scale=0.5)'",
    "'package.module:function'",
    "'path/to/file.py:function'",
    "a directory holding a saved sequence-classification reward model",
    "the hub id of one, e.g. 'org/reward-model' (offline: it must be in the local Hugging Face cache)",
)

# what a Hugging Face hub model id can look like: 'name' or 'org/name'
HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _forms_text() -> str:
    forms = [form.format(builtins=", ".join(BUILTIN_REWARDS)) for form in SPEC_FORMS]
    return "; ".join(forms)


def _unknown(spec: str, why: str) -> ConfigError:
    close = difflib.get_close_matches(spec, list(BUILTIN_REWARDS), n=1)
    hint = f"did you mean {close[0]!r}? Otherwise " if close else ""
    return ConfigError(f"reward {spec!r}: {why}", field="reward_funcs", fix=f"{hint}use one of: {_forms_text()}")


def _builtin_with_settings(spec: str) -> Callable | None:
    """``name(key=value, ...)`` for a built-in factory, with literal values; None if ``spec`` is not of that form."""
    head = spec.split("(", 1)[0].strip()
    if "(" not in spec or head not in BUILTIN_FACTORIES:
        return None
    try:
        call = ast.parse(spec, mode="eval").body
        if not isinstance(call, ast.Call):
            raise ValueError("not a call")
        args = [ast.literal_eval(a) for a in call.args]
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (SyntaxError, ValueError) as error:
        raise _unknown(spec, f"cannot read the settings ({error}); values must be literals") from error
    try:
        return BUILTIN_FACTORIES[head](*args, **kwargs)
    except TypeError as error:
        signature = inspect.signature(BUILTIN_FACTORIES[head])
        raise ConfigError(
            f"reward {spec!r}: {error}", field="reward_funcs", fix=f"{head} takes {signature}"
        ) from error


def _import_file(path: Path) -> Any:
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    module_name = f"posttrain_user_rewards_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {str(path)!r} as a Python file", field="reward_funcs")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # lets the file's own dataclasses and pickling find it
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the user's file may fail in any way; say which file and why
        del sys.modules[module_name]
        raise ConfigError(
            f"importing reward file {str(path)!r} failed: {type(error).__name__}: {error}", field="reward_funcs"
        ) from error
    return module


def _resolve_attribute(module: Any, attribute: str, spec: str, where: str) -> Callable:
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            defined = sorted(
                n
                for n, v in vars(module).items()
                if callable(v) and not n.startswith("_") and getattr(v, "__module__", None) == module.__name__
            )
            raise ConfigError(
                f"reward {spec!r}: {where} has no attribute {attribute!r}",
                field="reward_funcs",
                fix=f"use one of the callables it defines: {', '.join(defined) or '(none)'}",
            )
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"reward {spec!r}: {attribute!r} is a {type(target).__name__}, not a function", field="reward_funcs")
    return target


def _hub_reward_model(spec: str, tokenizer: Any = None) -> Callable:
    """A reward model by hub id: from the local Hugging Face cache, or downloaded when the hub may be reached."""
    from huggingface_hub import constants, try_to_load_from_cache

    from posttrain.models.reward_scoring import require_reward_model
    from posttrain.rewards.model_scorer import RewardModelScorer

    name = spec.rsplit("/", 1)[-1]  # TRL's name for a reward model: the last part of its id
    cached_config = try_to_load_from_cache(spec, "config.json")
    if isinstance(cached_config, str):
        # a causal LM under this id would get a random score head; judge it by its cached config
        require_reward_model(os.path.dirname(cached_config), field="reward_funcs")
        return RewardModelScorer(spec, tokenizer=tokenizer, name=name)
    if constants.HF_HUB_OFFLINE:
        raise _unknown(
            spec,
            "not a built-in reward, a module or file function or a directory, and no model with this hub id is in "
            f"the local Hugging Face cache ({constants.HF_HUB_CACHE}) while the hub is offline (HF_HUB_OFFLINE=1). "
            f"To use the hub model, download it first where there is a network (`hf download {spec}`), or unset "
            "HF_HUB_OFFLINE, or pass the directory of a saved copy",
        )
    try:
        return RewardModelScorer(spec, tokenizer=tokenizer, name=name)
    except ConfigError as error:
        raise _unknown(
            spec, f"not a built-in reward, a module or file function or a directory, and loading it as a hub "
            f"model failed ({error})",
        ) from error


def load_reward_func(spec: str | Callable, tokenizer: Any = None) -> Callable:
    """One reward function from one spec (see :func:`load_reward_funcs`); ``tokenizer`` is used by a reward model."""
    if callable(spec):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise ConfigError(f"a reward spec must be a string, got {type(spec).__name__}", field="reward_funcs", fix=_forms_text())
    text = os.fspath(spec).strip()
    if text in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[text]
    with_settings = _builtin_with_settings(text)
    if with_settings is not None:
        return with_settings
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _unknown(text, "this directory has no config.json, so it is not a saved model")
        from posttrain.models.reward_scoring import require_reward_model
        from posttrain.rewards.model_scorer import RewardModelScorer

        require_reward_model(path, field="reward_funcs")
        return RewardModelScorer(path, tokenizer=tokenizer, name=path.resolve().name)
    if ":" in text:
        location, attribute = text.rsplit(":", 1)
        if not attribute:
            raise _unknown(text, "nothing after ':'; name the function")
        if location.endswith(".py"):
            file = Path(location).expanduser()
            if not file.is_file():
                raise _unknown(text, f"file {location!r} does not exist")
            return _resolve_attribute(_import_file(file), attribute, text, f"file {location!r}")
        try:
            module = importlib.import_module(location)
        except ImportError as error:
            raise _unknown(text, f"cannot import module {location!r} ({error})") from error
        return _resolve_attribute(module, attribute, text, f"module {location!r}")
    if HUB_ID_PATTERN.match(text) and not text.endswith(".py"):
        return _hub_reward_model(text, tokenizer)
    raise _unknown(text, "not a built-in reward, a module or file function, a model directory or a hub id")


def load_reward_funcs(specs: Sequence[str | Callable] | str) -> list[Callable]:
    """Resolve reward specs, in order, to reward functions.

    Each spec is one of: a built-in name (see :func:`describe_builtins`); a built-in with settings,
    ``"length_penalty(target=128)"``; ``"package.module:function"``; ``"path/to/file.py:function"``;
    a directory holding a saved sequence-classification model, or the hub id of one (loaded with
    ``AutoModelForSequenceClassification``, from the local cache when ``HF_HUB_OFFLINE=1``), scored
    with :class:`RewardModelScorer` and named, as TRL names it, by the last part of its path or id.
    Callables are passed through. Anything else raises ConfigError listing the accepted forms.
    """
    if isinstance(specs, (str, os.PathLike)) or callable(specs):
        specs = [specs]
    return [load_reward_func(spec) for spec in specs]


def resolve_reward_funcs(reward_funcs: Any, reward_processing_classes: Any = None) -> list[Callable]:
    """What a trainer's ``reward_funcs`` and ``reward_processing_classes`` arguments hold, as reward functions.

    ``reward_funcs``: one entry or a list of callables, specs (:func:`load_reward_func`) and
    sequence-classification model instances (scored with :class:`RewardModelScorer`, named by the
    last part of their ``name_or_path`` as TRL names them). ``reward_processing_classes`` follows
    TRL: one entry per reward function (a single one stands for a list of one), the tokenizer of the
    reward model at that position, None for the one saved with the model; ignored for plain functions.
    """
    from torch import nn

    from posttrain.rewards.builtin import describe_builtins
    from posttrain.rewards.model_scorer import RewardModelScorer

    if reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and not reward_funcs):
        raise ConfigError(
            "no reward functions were given", field="reward_funcs",
            fix=f"pass reward_funcs=[...] (callables, model directories, hub ids or built-in names). {describe_builtins()}",
        )
    functions = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    tokenizers = reward_processing_classes
    if tokenizers is None:
        tokenizers = [None] * len(functions)
    elif not isinstance(tokenizers, (list, tuple)):
        tokenizers = [tokenizers]
    if len(tokenizers) != len(functions):
        raise ConfigError(
            f"{len(tokenizers)} reward_processing_classes for {len(functions)} reward functions",
            field="reward_processing_classes",
            fix="pass a list with one entry per reward function: the reward model's tokenizer, or None",
        )
    resolved = []
    for function, tokenizer in zip(functions, tokenizers):
        if isinstance(function, (str, os.PathLike)):
            resolved.append(load_reward_func(function, tokenizer=tokenizer))
        elif isinstance(function, nn.Module):
            source = str(getattr(function.config, "_name_or_path", "") or "reward_model").rstrip("/")
            resolved.append(RewardModelScorer(function, tokenizer=tokenizer, name=source.rsplit("/", 1)[-1]))
        elif callable(function):
            resolved.append(function)
        else:
            raise ConfigError(
                f"a reward function must be callable, a name or a model; got {type(function).__name__}",
                field="reward_funcs", fix=describe_builtins(),
            )
    return resolved


def trl_reward_views(functions: Sequence[Callable]) -> tuple[list[Any], list[Any]]:
    """``(reward_funcs, reward_processing_classes)`` as TRL's trainers hold them: a reward model as its
    ``nn.Module`` with its tokenizer, any other function as itself with None."""
    from posttrain.rewards.model_scorer import RewardModelScorer

    models = [f.model if isinstance(f, RewardModelScorer) else f for f in functions]
    tokenizers = [f.tokenizer if isinstance(f, RewardModelScorer) else None for f in functions]
    return models, tokenizers
