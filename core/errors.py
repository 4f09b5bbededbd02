"""User-facing errors.

Every error a user can cause (a bad key, file, prompt or plugin name) is a ``MedVLError``
subclass. The command line prints its message as one line and exits non-zero; a traceback
appears only with ``--debug``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MedVLError(Exception):
    """Base class of every error caused by user input."""


class ConfigError(MedVLError, ValueError):
    """A configuration key, value or type is wrong; the message names the dotted path."""


class PluginError(MedVLError, LookupError):
    """A plugin name is unknown, duplicated, or its distribution failed to load."""


class InputError(MedVLError, ValueError):
    """A volume, prompt or data file cannot be used; the message names it."""


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The closest match of ``word`` among ``choices``, or None when nothing is near."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    match = closest(word, choices)
    return f" (did you mean '{match}'?)" if match else ""
