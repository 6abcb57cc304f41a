"""Exceptions of the edge agent."""

from __future__ import annotations

from cnc_common.errors import CncError


class EdgeError(CncError):
    """Base class of edge agent errors."""
