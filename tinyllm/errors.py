"""The one exception type for user mistakes.

Entry points catch `TinyLLMError` and print its message without a traceback: a user who typed
a wrong path needs the fix, not our stack.
"""

from __future__ import annotations


class TinyLLMError(ValueError):
    """Bad input from the user: the message names the file/option, the problem and the fix."""
