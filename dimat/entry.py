"""What every entry point shares: finding and composing the config, one-line errors, exit codes.

``dimat simulate`` (:mod:`dimat.cli`), ``dimat peer`` (:mod:`dimat.grpc_peer`) and the torchrun
entry (:mod:`dimat.launch`) compose their config here and end a bad run the same way: one
``<prog>: error: ...`` line on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator, NoReturn, Sequence

from dimat.config import ConfigError
from dimat.files import BadFileError
from dimat.runtime import set_threads  # re-exported: the entry points apply it

EXIT_CONFIG = 2
GROUPS = ("model", "data", "partition", "topology", "merge", "transport", "attack", "experiment")
#: what a bad config or bad file raises on its way up; each becomes one error line
USER_ERRORS = (ConfigError, BadFileError, FileNotFoundError, NotADirectoryError, TimeoutError)


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), plus its cause's."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    cause = exc.__cause__
    detail = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
    return f"{first.rstrip('.')}: {detail}" if detail and detail not in first else first


def fail(message: str, prog: str = "dimat", code: int = EXIT_CONFIG) -> NoReturn:
    """Print one error line and exit."""
    print(f"{prog}: error: {message.splitlines()[0] if message else message}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def user_errors(prog: str = "dimat") -> Iterator[None]:
    """Turn configuration and file errors raised inside into :func:`fail`."""
    try:
        yield
    except USER_ERRORS as exc:
        fail(one_line(exc), prog)


def config_dir() -> Path:
    """The Hydra config folder: ``$DIMAT_CONFIG_DIR``, else ``configs/`` beside the package."""
    env = os.environ.get("DIMAT_CONFIG_DIR")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [here.parent / "configs", here / "configs"]
    for c in candidates:
        if (c / "config.yaml").is_file():
            return c
    raise FileNotFoundError(
        "dimat configs not found (looked in " + ", ".join(map(str, candidates)) +
        "); install with `pip install -e .` from the repository or set DIMAT_CONFIG_DIR"
    )


def check_group_choices(overrides: Sequence[str], cdir: Path | None = None) -> None:
    """Reject ``group=unknown`` with the list of choices (Hydra's own message is long)."""
    cdir = cdir or config_dir()
    for ov in overrides:
        if "=" not in ov or ov.startswith(("hydra.", "+", "~", "-")):
            continue
        key, _, value = ov.partition("=")
        key = key.lstrip("+~")
        if key not in GROUPS or value in ("null", ""):
            continue
        for choice in value.split(","):
            choice = choice.strip()
            if not (cdir / key / f"{choice}.yaml").is_file():
                available = sorted(p.stem for p in (cdir / key).glob("*.yaml"))
                noun = "data set" if key == "data" else key
                raise ConfigError(f"unknown {noun} {choice!r} (available: {', '.join(available)})")


def check_renamed(overrides: Sequence[str]) -> None:
    """An override of a key an earlier release had is one line naming what replaced it."""
    from dimat.config import RENAMED

    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key in RENAMED:
            raise ConfigError(f"{key} was replaced by {RENAMED[key]}")


def compose(overrides: Sequence[str] = (), *, transport: str | None = None) -> Any:
    """The composed config for ``overrides`` (``transport=<transport>`` added unless one is named).

    Hydra's global state is always cleared afterwards, so callers may compose again (tests, sweeps,
    a torchrun worker that composes before and after a restart).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = list(overrides)
    check_renamed(overrides)
    cdir = config_dir()
    check_group_choices(overrides, cdir)
    if transport and not any(o.split("=", 1)[0].lstrip("+~") == "transport" for o in overrides):
        overrides.insert(0, f"transport={transport}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(cdir), version_base=None):
            return hydra_compose("config", overrides=overrides)
    except ConfigError:
        raise
    except Exception as exc:  # any composition failure is a configuration error
        raise ConfigError(one_line(exc)) from None
    finally:
        GlobalHydra.instance().clear()


def load(overrides: Sequence[str] = (), *, transport: str | None = None) -> Any:
    """Compose and validate: the typed :class:`~dimat.config.RunConfig` for ``overrides``."""
    from dimat.config import RunConfig

    return RunConfig.from_config(compose(overrides, transport=transport))


def default_train_config(**overrides: Any) -> Any:
    """``configs/``' training settings (``train`` and ``merge.align_batches``) with ``overrides``."""
    import dataclasses

    return dataclasses.replace(load().train, **overrides)


def default_method(name: str, **merge: Any) -> Any:
    """A method by name with the ``merge:`` options of ``configs/`` (and ``merge`` overrides), outside a run.

    Args:
        name: a ``merge.method`` name (``dimat``, ``average``, ...).
        merge: ``merge:`` keys to override, e.g. ``bn_stats="average"``.

    Example:
        >>> default_method("average", bn_stats="average").merge(peer, {1: other.shared_state()}, {0: .5, 1: .5})  # doctest: +SKIP
    """
    from dimat.config import RunConfig
    from dimat.methods import build_method  # the method registry imports every method: only when asked

    base = compose([f"merge={name}"])
    section = {**dict(base["merge"]), **merge}
    return build_method(RunConfig.from_config({**dict(base), "merge": section}).merge)


__all__ = ["EXIT_CONFIG", "ConfigError", "one_line", "fail", "user_errors", "config_dir", "compose", "load",
           "check_group_choices", "set_threads", "default_train_config", "default_method"]
