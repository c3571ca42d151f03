"""Turn reward specs from the command line (or a config file) into reward functions."""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import os
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
)


def _forms_text() -> str:
    forms = [form.format(builtins=", ".join(BUILTIN_REWARDS)) for form in SPEC_FORMS]
    return "; ".join(forms)


def _unknown(spec: str, why: str) -> ConfigError:
    return ConfigError(f"reward {spec!r}: {why}", field="reward_funcs", fix=f"use one of: {_forms_text()}")


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


def load_reward_func(spec: str | Callable) -> Callable:
    """One reward function from one spec (see :func:`load_reward_funcs`)."""
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
        return RewardModelScorer(path)
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
    raise _unknown(text, "not a built-in reward, a module or file function, or a model directory")


def load_reward_funcs(specs: Sequence[str | Callable] | str) -> list[Callable]:
    """Resolve reward specs, in order, to reward functions.

    Each spec is one of: a built-in name (see :func:`describe_builtins`); a built-in with settings,
    ``"length_penalty(target=128)"``; ``"package.module:function"``; ``"path/to/file.py:function"``;
    a directory holding a saved sequence-classification model (scored with :class:`RewardModelScorer`).
    Callables are passed through. Anything else raises ConfigError listing the accepted forms.
    """
    if isinstance(specs, (str, os.PathLike)) or callable(specs):
        specs = [specs]
    return [load_reward_func(spec) for spec in specs]
