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


class RunInterrupted(Exception):
    """``fit`` stopped on SIGINT / SIGTERM after saving a checkpoint it can resume from."""

    def __init__(self, signal_name: str, folder: str, checkpoint: str | None) -> None:
        self.signal_name, self.folder, self.checkpoint = signal_name, folder, checkpoint
        saved = f"checkpoint {checkpoint}" if checkpoint else "no checkpoint yet (no step finished)"
        super().__init__(
            f"stopped by {signal_name}; {saved}; continue with: medvlsam2 fit --resume {folder}"
        )


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line.

    An error re-raised from a DataLoader worker carries the worker's traceback in its message;
    only its last line (the original message) is kept, so users never see a traceback.
    """
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        name, sep, message = last.partition(": ")  # "medvlsam2.core.errors.InputError: <message>"
        original = message if sep and name.rsplit(".", 1)[-1].endswith("Error") else last
        text = f"{original} (in a data-loader worker)"
    return " ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The closest match of ``word`` among ``choices``, or None when nothing is near."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    match = closest(word, choices)
    return f" (did you mean '{match}'?)" if match else ""
