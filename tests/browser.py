"""Find (or, as root on Debian, install) headless Chromium and its driver for the playground test."""

from __future__ import annotations

import os
import shutil
import subprocess

PACKAGES = ("chromium", "chromium-driver")
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _found() -> tuple[str, str] | None:
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def _apt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], capture_output=True, text=True, timeout=900, env=env)


def chromium() -> tuple[str, str] | str:
    """``(browser, chromedriver)`` paths, or why there are none (the caller skips with it).

    Missing binaries are installed from Debian's ``chromium`` and ``chromium-driver`` packages when
    this runs as root with apt-get (as CI does); the package lists are refreshed once if the
    first attempt fails.
    """
    found = _found()
    if found:
        return found
    if shutil.which("apt-get") is None:
        return "no chromium + chromedriver on PATH and no apt-get to install them (install Chromium and its driver)"
    if os.geteuid() != 0:
        return f"no chromium + chromedriver on PATH; as root: apt-get install {' '.join(PACKAGES)}"
    try:
        done = _apt("install", "-y", "--no-install-recommends", *PACKAGES)
        if done.returncode != 0:
            _apt("update")
            done = _apt("install", "-y", "--no-install-recommends", *PACKAGES)
    except subprocess.TimeoutExpired:
        return f"apt-get install {' '.join(PACKAGES)} did not finish within 900 s"
    found = _found()
    if found:
        return found
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return f"apt-get install {' '.join(PACKAGES)} failed (exit {done.returncode}): {' | '.join(tail)}"
