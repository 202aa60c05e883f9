"""The one exception type users see.

Anything a user can fix (a bad file, a wrong field, an unreadable image, a refused release) raises a
:class:`MedsiloError` subclass whose message names the file or field and what to do. The CLI prints
the message on one line and exits with status 2; it never shows a traceback for these.
"""

import difflib
from collections.abc import Iterable


class MedsiloError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class DataError(MedsiloError):
    """Images or manifests that cannot be used (unreadable files, identifying DICOM tags, bad labels).

    Args:
        message: the full explanation for the site's own staff (it may name files).
        public: a summary without file names or values, which a site may tell the server (counts and kinds of
            problems); ``None`` when only the kind of error may be told.
    """

    def __init__(self, message: str, public: str | None = None):
        super().__init__(message)
        self.public = public


def did_you_mean(value: object, options: Iterable[object]) -> str:
    """``"did you mean 'x'? "`` for the option closest to ``value``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'? " if close else ""
