"""Bounds that more than one stage shares, so that what one stage accepts the next can hold."""

from __future__ import annotations

# Classes a features file may name and a head may predict: a `.cls` number from an archive is
# a class index, so 0 to MAX_CLASSES - 1; above that it is a broken label, not a class.
MAX_CLASSES = 100_000
