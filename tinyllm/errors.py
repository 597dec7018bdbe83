"""The one exception type for user mistakes.

Entry points catch `TinyLLMError` and print its message without a traceback: a user who typed
a wrong path needs the fix, not our stack.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


class TinyLLMError(ValueError):
    """Bad input from the user: the message names the file/option, the problem and the fix."""


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """For entry points: a TinyLLMError becomes `error: <message>` on stderr and exit code 2."""
    try:
        yield
    except TinyLLMError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
