"""Tools for testing and studying chat flows: public, documented, stable.

* :class:`FaultProxy`: a TCP proxy that adds latency, caps bandwidth, resets
  connections, refuses new ones, or blackholes traffic, at runtime or on a schedule.
* :class:`MockServer`: an in-process protocol-v1 server with canned replies, a scripted
  escalation to a mock staff member, and faults on demand.
"""

from ._mock import CannedReply, MockServer
from ._proxy import FaultProxy

__all__ = ["CannedReply", "FaultProxy", "MockServer"]
