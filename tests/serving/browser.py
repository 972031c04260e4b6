"""A real headless Chromium for the page test: Debian's ``chromium`` and ``chromium-driver``, installed
with apt-get where this test may (root, or non-interactive sudo), driven by selenium; ``pytest.skip``
with the reason where it cannot be had."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
PACKAGES = ("chromium", "chromium-driver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking")


def _apt_install() -> str | None:
    """Install the packages; None on success, else why not."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available on this machine"
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            return "not root and sudo is not available"
        prefix = ["sudo", "-n"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = [*prefix, "apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:  # package lists missing or stale (404s): refresh them once and try again
        subprocess.run([*prefix, "apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        return f"`{' '.join(cmd)}` failed: " + " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
    return None


def chrome_driver(width: int = 1500, height: int = 1100):
    """A selenium WebDriver on headless Chromium (skips the test, saying why, when there is none)."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (a dev dependency)")
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        why = _apt_install()
        if why is not None or not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
            pytest.skip(f"headless Chromium is not available ({' and '.join(PACKAGES)}): {why or 'not installed'}")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
