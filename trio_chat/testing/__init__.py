"""Tools for testing and studying chat flows: public, documented, stable.

* :class:`FaultProxy`: a TCP proxy that adds latency, caps bandwidth, resets
  connections, refuses new ones, or blackholes traffic, at runtime or on a schedule.
"""

from ._proxy import FaultProxy

__all__ = ["FaultProxy"]
