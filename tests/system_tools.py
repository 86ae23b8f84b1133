"""System binaries some tests need (promtool, prometheus, Chromium and its driver).

Without them those tests skip with a message saying how to install them, so the README's test
command passes on any machine; under CI=true (where .ci/run installs them) a missing binary fails
the test instead of skipping it. This module holds no tests.
"""

from __future__ import annotations

import os
import shutil

import pytest

APT = {
    "promtool": "apt-get install -y prometheus (Debian/Ubuntu; the package ships promtool), or a release "
                "from prometheus.io on PATH",
    "prometheus": "apt-get install -y prometheus (Debian/Ubuntu), or a release from prometheus.io on PATH",
    "chromium": "apt-get install -y chromium chromium-driver (Debian/Ubuntu)",
    "chromedriver": "apt-get install -y chromium chromium-driver (Debian/Ubuntu)",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def find(name: str, *alternatives: str) -> str | None:
    for n in (name, *alternatives):
        path = shutil.which(n) or (f"/usr/bin/{n}" if os.access(f"/usr/bin/{n}", os.X_OK) else None)
        if path:
            return path
    return None


def require(name: str, *alternatives: str) -> str:
    """The binary's path; else skip (fail under CI=true) saying how to install it."""
    path = find(name, *alternatives)
    if path:
        return path
    message = f"`{name}` is not installed; install it with: {APT.get(name, name)}"
    if in_ci():
        pytest.fail(message + " (CI=true: .ci/run installs it, so its tests must run)", pytrace=False)
    pytest.skip(message)
