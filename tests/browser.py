"""Debian's Chromium for the browser tests, launched one way everywhere.

Playwright cannot download browsers here, so it drives the system's `chromium` through
`executable_path` (`.ci/run` installs it). Where it is missing the tests skip, except
under CI=true, where that is a failure.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Final

import pytest

CHROMIUM: Final = shutil.which("chromium") or shutil.which("chromium-browser")

# Headless on a machine with no network but loopback: without the background-networking
# flags Chromium keeps trying (and failing) to reach Google's hosts.
CHROMIUM_ARGS: Final = (
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)


def require_chromium(*, module: bool = False) -> None:
    """Skip the calling test (or, with ``module``, its whole module) without Chromium;
    fail under CI=true."""
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "Chromium is required under CI=true (apt-get install chromium)", pytrace=False
            )
        pytest.skip(
            "Chromium is not installed (apt-get install chromium)", allow_module_level=module
        )


def launch(playwright: Any, *extra_args: str) -> Any:
    """A headless Chromium with the common flags and ``extra_args``."""
    require_chromium()
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, *extra_args])
