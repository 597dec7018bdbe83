"""Hydra entry points: Hydra's own config errors reported the way tinyllm reports bad input.

A typo in an override (`norm=rmsnrom`, `optim.lrr=1`) is caught by Hydra before our code runs.
Left alone, Hydra prints several lines ending in "Set the environment variable
HYDRA_FULL_ERROR=1" and exits with code 1. The README promises one paragraph and exit code 2
for every user mistake, so `hydra_entry` runs an entry point with Hydra told to re-raise
(HYDRA_FULL_ERROR=1), turns its config errors into one paragraph that names the group or key,
the valid options and the closest match, and hands every other error back to Hydra's usual
report. A user who sets HYDRA_FULL_ERROR=1 themselves gets Hydra's full traces, as before.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from tinyllm.errors import TinyLLMError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def hydra_entry(main: Callable[[], Any], config_name: str) -> None:
    """Run a `@hydra.main` function; a config error exits 2 with one paragraph on stderr."""
    from hydra.errors import CompactHydraException

    user_full = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its report
    try:
        if config_name == "train":
            sys.argv[1:] = resume_in_place(sys.argv[1:])
        main()
    except TinyLLMError as e:
        _exit_config_error(str(e))
    except CompactHydraException as e:  # parsing overrides, composing the config
        if user_full == "1":
            raise
        try:
            msg = config_error_message(e, config_name, _overrides(sys.argv[1:]))
        except Exception:  # never let the wording of an error hide the error itself
            msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        _exit_config_error(msg)
    except Exception as e:
        if user_full == "1":
            raise
        _report_like_hydra(e)


def resume_in_place(argv: list[str], outputs: str | Path = "outputs") -> list[str]:
    """Resuming continues the run in its own directory (one checkpoint set, one history).

    - `resume=RUN_DIR` (or `resume=latest`): the run's own composed config
      (RUN_DIR/.hydra/config.yaml), its directory and its checkpoints/last.ckpt; further
      overrides apply on top (e.g. a larger trainer.max_steps).
    - `ckpt_path=RUN_DIR/checkpoints/X.ckpt` (or `ckpt_path=latest`): the command as given,
      run in RUN_DIR instead of a new outputs/<date>/<time>/ (unless hydra.run.dir= is given).
    Hydra picks the run directory before our code runs, hence a rewrite of the command line.
    """
    multirun = any(a in ("-m", "--multirun") for a in argv)
    resume = [a for a in argv if a.startswith("resume=")]
    if resume and multirun:
        raise TinyLLMError("resume= continues one run; it cannot be part of a sweep (-m).")
    if resume:
        run = _run_dir(resume[-1].split("=", 1)[1], outputs, "resume")
        rest = [a for a in argv if not a.startswith(("resume=", "ckpt_path=", "hydra.run.dir="))]
        return [
            "--config-dir", str(run / ".hydra"), "--config-name", "config",
            f"hydra.run.dir={run}", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", *rest,
        ]  # fmt: skip
    ckpt = [a for a in argv if a.startswith("ckpt_path=")]
    if not ckpt or multirun or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    value = ckpt[-1].split("=", 1)[1]
    if value == "latest":
        path = _run_dir("latest", outputs, "ckpt_path") / "checkpoints" / "last.ckpt"
        argv = [a for a in argv if not a.startswith("ckpt_path=")] + [f"ckpt_path={path}"]
    else:
        path = Path(value)
    if path.parent.name != "checkpoints":
        return argv  # a checkpoint outside a run directory: a new run directory
    return [*argv, f"hydra.run.dir={path.parent.parent}"]


def _run_dir(spec: str, outputs: str | Path, option: str) -> Path:
    """A run directory with checkpoints/last.ckpt: the one named, or the newest under outputs/."""
    if spec == "latest":
        found = sorted(
            Path(outputs).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime
        )
        if not found:
            raise TinyLLMError(
                f"{option}=latest found no checkpoints/last.ckpt under '{outputs}/'. Train a "
                "model first (`python -m tinyllm.train`), or name the run directory."
            )
        return found[-1].parent.parent
    run = Path(spec)
    need = [run / "checkpoints" / "last.ckpt"] + (
        [run / ".hydra" / "config.yaml"] if option == "resume" else []
    )
    missing = [str(p) for p in need if not p.is_file()]
    if missing:
        raise TinyLLMError(
            f"{option}={spec}: {', '.join(missing)} not found. Pass the directory of a run "
            "started by `python -m tinyllm.train` (outputs/<date>/<time>, the folder holding "
            f"checkpoints/ and .hydra/), or {option}=latest for the newest one."
        )
    return run


def _exit_config_error(msg: str) -> NoReturn:
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)


def _report_like_hydra(e: Exception) -> NoReturn:
    """Hydra's usual report of an unexpected error (trimmed traceback, exit code 1)."""
    from hydra._internal.utils import run_and_report

    os.environ.pop("HYDRA_FULL_ERROR", None)

    def reraise() -> None:
        raise e

    run_and_report(reraise)
    sys.exit(1)  # (run_and_report exits itself; this is for type checkers)


def _overrides(argv: Sequence[str]) -> list[str]:
    """The key=value overrides of a command line (flags such as -m and --cfg left out)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp"):
            skip = True  # (these take a value)
        elif not a.startswith("-") and "=" in a:
            out.append(a)
    return out


def _key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def config_error_message(e: Exception, config_name: str, overrides: Sequence[str]) -> str:
    """One paragraph for a Hydra config error: what was wrong, the valid choices, the fix."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(e, MissingConfigException) and e.missing_cfg_file and "/" in e.missing_cfg_file:
        group, _, name = e.missing_cfg_file.rpartition("/")
        return _unknown_option(group, name, list(e.options or []))
    if isinstance(e, OverrideParseException):
        return (
            f"`{e.override}` is not a valid override ({_first_line(e.message)}). Write "
            "key=value or group=option; quote values with spaces, commas or brackets for the "
            """shell and for Hydra, e.g. prompt="'Hello, world'" or stop='["\\n\\n"]'."""
        )
    full_key = _full_key(e)
    if full_key is None and "No match in the defaults list" in str(e):
        full_key = _quoted(str(e))  # `group=option` for a group this command does not have
    if full_key:
        others = [o for o in overrides if not _key_of(o).startswith(full_key)]
        deleting = any(o.startswith("~") and _key_of(o) == full_key for o in overrides)
        return _unknown_key(full_key, config_name, others, deleting)
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def _unknown_option(group: str, name: str, options: list[str]) -> str:
    folder = "experiments/" if group == "experiment" else f"conf/{group}/"
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    hint = f" Did you mean `{group}={close[0]}`?" if close else ""
    return (
        f"`{group}={name}`: the config group `{group}` has no option `{name}` (no "
        f"{folder}{name}.yaml). Valid options: {', '.join(options) or '(none)'}.{hint}"
    )


def _unknown_key(
    full_key: str, config_name: str, others: Sequence[str], deleting: bool = False
) -> str:
    parent, missing, siblings = _locate(full_key, config_name, others)
    where = f"`{parent}`" if parent else f"the {config_name} config"
    close = difflib.get_close_matches(missing, siblings, n=1, cutoff=0.5)
    path = f"{parent}.{close[0]}" if parent and close else (close[0] if close else "")
    hint = f" Did you mean `{path}`?" if close else ""
    add = "" if deleting else f" To add a new key on purpose, write `+{full_key}=...`."
    return (
        f"`{full_key}`: {where} has no key `{missing}`. Valid keys there: "
        f"{', '.join(siblings) or '(none)'}.{hint}{add}"
    )


def _locate(full_key: str, config_name: str, others: Sequence[str]) -> tuple[str, str, list[str]]:
    """(parent path, first missing component, keys available at the parent) of a bad key."""
    from omegaconf import DictConfig

    cfg, groups = _compose(config_name, others)
    parts = full_key.split(".")
    node: Any = cfg
    for i, part in enumerate(parts):
        if isinstance(node, DictConfig) and part in node and i < len(parts) - 1:
            node = node[part]
            continue
        keys = sorted(str(k) for k in node) if isinstance(node, DictConfig) else []
        if i == 0:  # at the top, a group name is a valid thing to type too
            keys = sorted(set(keys) | set(groups))
        return ".".join(parts[:i]), part, keys
    return ".".join(parts[:-1]), parts[-1], []


def _compose(config_name: str, overrides: Sequence[str]) -> tuple[Any, list[str]]:
    """The config with the other overrides (without them if they fail too), and its groups."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    for ovs in (list(overrides), []):
        try:
            with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
                cfg = compose(config_name, overrides=ovs, return_hydra_config=True)
        except Exception:
            continue
        choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
        groups = [g for g in choices if not g.startswith("hydra/") and g != "hydra"]
        return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), groups
    return OmegaConf.create({}), []


def _full_key(e: BaseException) -> str | None:
    cause = e.__cause__
    key = getattr(cause, "full_key", None)
    if key:
        return str(key)
    if "Could not override '" in str(e) or "does not exist" in str(e):
        return _quoted(str(e))
    return None


def _quoted(text: str) -> str | None:
    start = text.find("'")
    end = text.find("'", start + 1)
    return text[start + 1 : end] if 0 <= start < end else None


def _first_line(text: str) -> str:
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")
