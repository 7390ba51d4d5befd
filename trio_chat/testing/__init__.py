"""Tools for testing and studying chat flows: public, documented, stable.

* :class:`FaultProxy`: a TCP proxy that adds latency, caps bandwidth, resets
  connections, refuses new ones, or blackholes traffic, at runtime or on a schedule.
* :class:`MockServer`: the real server's session core in memory, in-process, with
  canned replies (:class:`ScriptedResponder`), a scripted staff member who answers
  hand-offs, and faults on demand.
* :func:`run_scenario`: scripted guests and staff from ``data/scenarios/*.toml``,
  every event recorded with its time; :func:`summarize` charts what happened.
* :func:`soak`: many guests through scheduled faults (drops, blackholes, latency, a
  graceful restart and a ``kill -9``), then an exact account of what was lost,
  doubled or reordered (``trio-chat soak``); :func:`soak_cluster` does it to a
  cluster of nodes on PostgreSQL and Redis (``trio-chat soak --cluster N``).
"""

from ._experiments import OutageResult, outage_experiment, simulate_outage
from ._mock import CannedReply, MockServer, ScriptedResponder
from ._proxy import FaultProxy
from ._scenarios import (
    Scenario,
    ScenarioResult,
    load_scenario,
    run_scenario,
    scenario_files,
    summarize,
)
from ._soak import Fault, SoakReport, parse_faults, soak, soak_cluster

__all__ = [
    "CannedReply",
    "Fault",
    "FaultProxy",
    "MockServer",
    "OutageResult",
    "Scenario",
    "ScenarioResult",
    "ScriptedResponder",
    "SoakReport",
    "load_scenario",
    "outage_experiment",
    "parse_faults",
    "run_scenario",
    "scenario_files",
    "simulate_outage",
    "soak",
    "soak_cluster",
    "summarize",
]
