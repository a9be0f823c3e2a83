"""The one error type for bad sensor input."""

from __future__ import annotations


class MessageError(ValueError):
    """A message that cannot be turned into an array: its text names the field and the values.

    Raised for malformed, truncated, oversized or unsupported input. Readers never let a numpy,
    OpenCV or struct exception escape for bad input, and never allocate from an unchecked size field.
    """
