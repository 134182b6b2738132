"""The one exception type medsr raises for bad input, so callers catch a single thing.

Each error carries a :class:`Category`, so a caller that sorts failures (the archive's table of skip reasons)
switches on the category and never parses message text, which is written for people and may change.
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Category", "MedsrError"]


class Category(str, Enum):
    """What kind of problem a :class:`MedsrError` reports.

    The input categories (every one but ``INVALID``) say the *input* cannot be enhanced; ``INVALID`` is a bad
    setting, value or call (the default, so a plain ``MedsrError(msg)`` is never mistaken for a bad scan).
    """

    INVALID = "invalid"  # a bad setting, option or value given by the caller
    NOT_FOUND = "not_found"  # no such file, folder, series or reference
    UNREADABLE = "unreadable"  # not a file of the format it should be (not DICOM, not NIfTI)
    DAMAGED = "damaged"  # the right format, but truncated or corrupted
    NOT_IMAGE = "not_image"  # a valid object without an image: SR, RTSTRUCT, DICOMDIR index
    UNDECODABLE = "undecodable"  # pixel data in a transfer syntax no installed codec decodes
    GEOMETRY = "geometry"  # slices that do not form a regular grid (gaps, repeats, mixed orientation, shear)
    UNSUPPORTED = "unsupported"  # a valid layout medsr does not handle (4D, several multi-frame files)
    EMPTY = "empty"  # no voxels
    NON_FINITE = "non_finite"  # NaN or Inf voxels
    TOO_SMALL = "too_small"  # smaller than the model can work on
    TOO_LARGE = "too_large"  # declares more voxels than the configured limit (MEDSR_MAX_IMAGE_BYTES)


class MedsrError(Exception):
    """A problem with a scan, a model or a setting, explained for the user.

    The message always names the file (or setting) and what is wrong with it; never patient identifiers.

    Args:
        message: what is wrong, for people.
        category: what kind of problem it is, for programs; :attr:`Category.INVALID` when not given.
    """

    def __init__(self, message: str, category: Category = Category.INVALID) -> None:
        super().__init__(message)
        self.category = Category(category)

    def __reduce__(self) -> tuple[type[MedsrError], tuple[str, Category]]:
        """Keep the category when the error crosses a process boundary (pickling)."""
        return (type(self), (str(self), self.category))
