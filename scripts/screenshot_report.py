"""Render a report in headless Chromium and save a PNG, to check that its figures draw.

Usage: python scripts/screenshot_report.py REPORT.html OUT.png [--chromium PATH]

It also loads the page once more with ``--dump-dom`` and prints how many plotly figures drew.

The report embeds plotly.js, so it renders from a ``file://`` URL with networking off. Chromium
is the Debian package ``chromium`` (``apt-get install -y chromium``). A fresh profile directory
per run keeps it from reusing state; ``--virtual-time-budget`` lets plotly finish drawing
before the screenshot is taken.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT_CHROMIUM = "/usr/bin/chromium"
WINDOW = "1200,3000"  # width,height in CSS pixels


def find_chromium(explicit: str | None = None) -> str | None:
    """The Chromium executable: ``explicit``, /usr/bin/chromium, or one on PATH."""
    for candidate in (explicit, DEFAULT_CHROMIUM, "chromium", "chromium-browser"):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


def _run_chromium(
    chromium: str, report: Path, mode: list[str], timeout_s: float
) -> subprocess.CompletedProcess:
    """Chromium on ``report`` with a fresh profile, no network services, and ``mode`` flags."""
    with tempfile.TemporaryDirectory(prefix="mlsae-chromium-") as profile:
        cmd = [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            *mode,
            "--virtual-time-budget=10000",
            report.as_uri(),
        ]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)


def screenshot(report: Path, out: Path, chromium: str, timeout_s: float = 120.0) -> Path:
    """Write a PNG of ``report`` to ``out``; raise ``RuntimeError`` when none appears."""
    report, out = Path(report).resolve(), Path(out).resolve()
    if not report.is_file():
        raise FileNotFoundError(f"no report at {report}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    proc = _run_chromium(
        chromium, report, [f"--screenshot={out}", f"--window-size={WINDOW}"], timeout_s
    )
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(
            f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
        )
    return out


def drawn_figures(report: Path, chromium: str, timeout_s: float = 120.0) -> int:
    """How many plotly figures the page drew: plotly.js adds ``js-plotly-plot`` to each
    figure's div once it has rendered it, so a page whose script failed counts 0."""
    proc = _run_chromium(chromium, Path(report).resolve(), ["--dump-dom"], timeout_s)
    return proc.stdout.count("plotly-graph-div js-plotly-plot")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="report.html to render")
    parser.add_argument("out", type=Path, help="PNG to write")
    parser.add_argument("--chromium", default=None, help="Chromium executable")
    args = parser.parse_args(argv)
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("chromium not found: apt-get install -y chromium", file=sys.stderr)
        return 2
    try:
        path = screenshot(args.report, args.out, chromium)
        n_figures = drawn_figures(args.report, chromium)
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"screenshot failed: {exc}", file=sys.stderr)
        return 1
    print(f"{path} ({n_figures} figures drawn)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
