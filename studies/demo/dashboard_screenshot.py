"""Screenshot of the demo study in optuna-dashboard, for docs/dashboard.png.

Run from the directory where `paretoq search --budget 3.0 --trials 40` ran (it serves the study that
search used last there): `python studies/demo/dashboard_screenshot.py OUT.png`. Needs Debian's
chromium and the playwright package (both in the dev set-up).
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main(out: str) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # optuna-dashboard lists the study's figures in set order, which follows Python's string hashing:
    # a fixed seed puts the front first, beside the hypervolume history.
    env = {**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "3")}
    server = subprocess.Popen([sys.executable, "-m", "paretoq.cli", "dashboard", "--port", str(port)], env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                studies = json.loads(urllib.request.urlopen(f"{base}/api/studies", timeout=5).read())
                break
            except OSError:
                time.sleep(0.5)
        study_id = studies["study_summaries"][0]["study_id"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 900})
            page.goto(f"{base}/dashboard/studies/{study_id}", timeout=60_000)
            page.get_by_text("Verified front").first.wait_for(timeout=60_000)
            # Scroll the figures under the app bar (which names the study), then let plotly settle.
            page.locator("[id='user-defined-plot:paretoq-front']").evaluate(
                "e => window.scrollBy(0, e.getBoundingClientRect().top - 120)")
            time.sleep(2)
            page.screenshot(path=out)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=20)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "dashboard.png")
