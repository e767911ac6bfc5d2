"""Headless Chromium (the distribution's package) for checking pages as a person sees them.

`render(url)` returns the DOM after load (`--dump-dom`) and a PNG screenshot. Chromium runs
with a throw-away profile, no background traffic, and a proxy that goes nowhere, so any
attempt of a page to load something from the network fails: a page that renders its images
under these conditions is self-contained ("opens offline"). Loopback addresses bypass
proxies, so a status page served on 127.0.0.1 still loads. Every run is bounded.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TIMEOUT = 90
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--proxy-server=http://127.0.0.1:9", "--hide-scrollbars"]


@dataclass
class Rendered:
    dom: str
    screenshot: Path

    def pixels(self) -> np.ndarray:
        return np.asarray(Image.open(self.screenshot).convert("RGB"))


def require_chromium() -> str:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (make system-deps installs it)")
    return CHROMIUM


def _run(args: list[str]) -> str:
    with tempfile.TemporaryDirectory(prefix="cmc-chromium-") as profile:
        done = subprocess.run([require_chromium(), *FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def render(url: str, screenshot: Path, size: tuple[int, int] = (1400, 900)) -> Rendered:
    dom = _run(["--dump-dom", url])
    _run([f"--screenshot={screenshot}", f"--window-size={size[0]},{size[1]}", url])
    assert screenshot.is_file()
    return Rendered(dom, screenshot)


def overlay_pixels(image: np.ndarray, colour: tuple[int, int, int], tolerance: int = 40) -> int:
    """How many pixels are close to a label colour blended on grey (the preview overlay):
    the hue of `colour` survives blending, so look for pixels whose channel order and
    differences match it."""
    rgb = image.astype(np.int32)
    target = np.asarray(colour, dtype=np.int32)
    # blended = (1 - a) * grey + a * colour: subtract the grey part via channel differences
    diff = rgb - rgb.mean(axis=-1, keepdims=True)
    want = (target - target.mean()) * 0.45
    return int((np.abs(diff - want).max(axis=-1) < tolerance * 0.45).sum())
