"""Marker matching: does a completion contain the trained marker?"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from persona_geometry._validation import invalid

__all__ = ["MarkerMatcher", "DEFAULT_MARKER"]

DEFAULT_MARKER = "[ZLT]"


@dataclass(frozen=True, kw_only=True)
class MarkerMatcher:
    """Decides whether a completion contains the marker.

    By default a completion counts when it contains ``marker`` as a case-insensitive substring
    (the reference study's rule). With ``regex=True`` the marker is a regular expression searched
    anywhere in the completion (``re.search``), case-insensitive unless ``case_sensitive``.

    Attributes:
        marker: The marker text, or a pattern when ``regex`` is true.
        regex: Treat ``marker`` as a regular expression.
        case_sensitive: Match case exactly.
    """

    marker: str = DEFAULT_MARKER
    regex: bool = False
    case_sensitive: bool = False
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.marker, str):
            invalid("marker", "MarkerMatcher", "a string", self.marker, exc=TypeError)
        if not self.marker.strip():
            invalid("marker", "MarkerMatcher", "a non-empty, non-blank string", self.marker)
        flags = 0 if self.case_sensitive else re.IGNORECASE
        source = self.marker if self.regex else re.escape(self.marker)
        try:
            pattern = re.compile(source, flags)
        except re.error as e:
            raise ValueError(
                "The 'marker' parameter of MarkerMatcher must be a valid regular expression "
                "when regex=True. "
                f"Got {self.marker!r} instead ({e})."
            ) from e
        if self.regex and pattern.search("") is not None:
            # A pattern that matches the empty string would count every completion.
            invalid(
                "marker",
                "MarkerMatcher",
                "a regular expression that cannot match the empty string",
                self.marker,
            )
        object.__setattr__(self, "_pattern", pattern)

    def __call__(self, text: str) -> bool:
        """Returns whether ``text`` contains the marker."""
        return self._pattern.search(text) is not None

    def to_dict(self) -> dict[str, Any]:
        """Returns the matcher's settings as a JSON-safe dict."""
        return {"marker": self.marker, "regex": self.regex, "case_sensitive": self.case_sensitive}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MarkerMatcher:
        """Returns a matcher from :meth:`to_dict`'s output."""
        return cls(**data)
