"""Look up a swappable part by name, failing with the list of valid names.

Each registry is a plain dict (name -> class); its keys are the file names of the matching Hydra
config group (conf/norm/*.yaml, conf/activation/*.yaml, conf/pos/*.yaml), so an override such as
`norm=rmsnorm` selects both the YAML and the class.
"""

from __future__ import annotations

from typing import TypeVar

from tinyllm.errors import TinyLLMError

T = TypeVar("T")


def lookup(registry: dict[str, T], name: str, option: str) -> T:
    """`registry[name]`, or a TinyLLMError naming the option and the valid choices."""
    try:
        return registry[name]
    except (KeyError, TypeError):
        valid = ", ".join(sorted(registry))
        raise TinyLLMError(
            f"Unknown model.{option} {name!r}. Valid choices are: {valid}. Fix the override "
            f"(`{option}=<name>` on the command line, or `model.{option}` in the config); each "
            f"choice is a file conf/{option}/<name>.yaml."
        ) from None
