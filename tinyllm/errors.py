"""The one exception type for user mistakes, and the one way entry points report it.

Entry points (train, prepare, generate, export, visualize, report) run their work inside
`exit_on_user_error()`: a `TinyLLMError` becomes one paragraph on stderr, `error: <message>`,
and exit code 2, without a traceback: a user who typed a wrong path needs the fix, not our
stack. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class TinyLLMError(ValueError):
    """Bad input from the user: the message names the file/option, the problem and the fix."""


@contextmanager
def exit_on_user_error(
    on_error: Callable[[str], None] | None = None, exit: bool = True
) -> Iterator[None]:
    """A TinyLLMError becomes `error: <message>` on stderr and exit code 2.

    `on_error(message)` runs first (train marks its metrics.json failed). `exit=False` (one
    job of a sweep) reports the error and goes on, so the sweep's other jobs still run.
    """
    try:
        yield
    except TinyLLMError as e:
        if on_error is not None:
            on_error(str(e))
        print(f"error: {e}", file=sys.stderr, flush=True)
        if exit:
            sys.exit(2)
