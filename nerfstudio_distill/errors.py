"""Every user-facing error type of the plugin, and their one-line formatting.

Each error's message is one line that names the fix (the flag or file to change). Console entry points
and the trainer turn any :class:`DistillError` into ``error: <message>`` on stderr and a non-zero exit,
with no traceback. This module imports nothing of the plugin, so every layer can use it.
"""

from __future__ import annotations


class DistillError(ValueError):
    """A user-facing configuration or input error: one line that names the fix."""


class PriorInputError(DistillError):
    """Bad input to a prior (size, range, prompt)."""


class PriorLoadError(DistillError, RuntimeError):
    """A prior's weights or libraries could not be loaded."""


class SceneError(DistillError):
    """Invalid synthetic-scene or camera input."""


class Distill2DError(DistillError):
    """Bad input to ``ns-distill-2d``."""


class EvalError(DistillError):
    """Bad input to ``ns-distill-eval``."""


class DemoError(DistillError):
    """Bad input to the demo."""


class PersonalizeError(DistillError):
    """Bad input to ``ns-distill-personalize``."""


def one_line(error: BaseException, limit: int = 200) -> str:
    """``Type: message`` of a foreign exception, whitespace folded, cut at ``limit`` characters."""
    text = " ".join(str(error).split()) or "no message"
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def exit_message(error: DistillError, flag_prefix: str = "") -> str:
    """The line a console script exits with; ``flag_prefix`` rewrites ``--pipeline.`` flags (scripts whose
    options are not under ``--pipeline``)."""
    text = str(error)
    if flag_prefix:
        text = text.replace("--pipeline.", flag_prefix)
    return f"error: {text}"
