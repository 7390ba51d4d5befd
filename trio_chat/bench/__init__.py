"""``trio-chat bench``: every figure beside a baseline measured in the same run.

The package: ``_loadgen`` (raw asyncio WebSocket connections and the null server),
``_workers`` (the child processes), ``_peers`` (the servers a user would pick instead),
``_profile`` (the cost breakdown), ``_scenarios`` (what is measured), ``_report``
(tables, targets, JSON and plots). Only the CLI imports it.
"""

from ._report import bench_command, build_parser

__all__ = ["bench_command", "build_parser"]
