"""The one exception type medsr raises for bad input, so callers catch a single thing."""

from __future__ import annotations

__all__ = ["MedsrError"]


class MedsrError(Exception):
    """A problem with a scan, a model or a setting, explained for the user.

    The message always names the file (or setting) and what is wrong with it; never patient identifiers.
    """
