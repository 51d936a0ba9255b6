"""Notebook 11 in a real JupyterLab, driven by headless Chromium: run it, move the interpolation
slider, and wait for the explorer to answer.

Needs Debian's `chromium` (found with shutil.which) and Python `playwright` (which drives it; its
own browser download is never used). `make test` installs both when it can; elsewhere this test
skips with the reason, except under CI=true, where a missing piece is a failure.

The notebook runs at the smoke preset on the tests' shared smoke artifacts (conftest.py), through
a copy with the parameters injected by papermill, as the course runner does. The
screenshot goes to build/browser/.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PORT = 18_888
SHOT_DIR = ROOT / "build" / "browser"

pytestmark = pytest.mark.slow


def _missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Python playwright is not installed (pip install playwright; `make test` does this)"
    if shutil.which("chromium") is None:
        return "no `chromium` on PATH (as root on Debian: apt-get install chromium; `make test` does this)"
    return None


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def _wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"jupyter lab did not answer at {url} within {timeout:.0f}s")


def _accept_kernel_dialog(page, wait_ms: int = 3000) -> None:
    """Click "Select" if JupyterLab shows its kernel dialog within `wait_ms`."""
    dialog = page.locator(".jp-Dialog", has_text="Select Kernel")
    try:
        dialog.wait_for(state="visible", timeout=wait_ms)
    except Exception:  # playwright's TimeoutError: no dialog, nothing to do
        return
    dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
    dialog.wait_for(state="hidden", timeout=10_000)


@pytest.fixture
def lab(tmp_path, smoke_artifacts):
    """JupyterLab on loopback serving a parametrised copy of notebook 11; killed by PID after."""
    reason = _missing()
    if reason:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the browser test cannot run under CI: {reason}")
        pytest.skip(reason)
    if not _port_free(PORT):
        pytest.fail(f"port {PORT} is taken: another JupyterLab (or an earlier run of this test) is still up")
    import papermill as pm

    from unclip_lite.config import get_preset
    from unclip_lite.judge import ensure_judge
    ensure_judge(smoke_artifacts, get_preset("smoke"), progress=False)  # the rest of the stages are in the fixture
    token = secrets.token_urlsafe(24)  # fresh per run; XSRF checks stay on
    work = tmp_path / "lab"
    work.mkdir()
    pm.execute_notebook(str(ROOT / "notebooks" / "11_edits_interpolations.ipynb"), str(work / "11.ipynb"), prepare_only=True,
                        parameters={"preset": "smoke", "artifacts_dir": str(smoke_artifacts),
                                    "progress": False})
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={PORT}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
           "--LabApp.news_url="]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    config_dir = tmp_path / "jupyter_config"  # a clean config: no user settings, no news pop-up over the page
    (config_dir / "labconfig").mkdir(parents=True)
    (config_dir / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    log = open(tmp_path / "jupyter.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "JUPYTER_CONFIG_DIR": str(config_dir)})
    try:
        _wait_for_server(f"http://127.0.0.1:{PORT}/api/status?token={token}", proc)
        yield f"http://127.0.0.1:{PORT}/lab/tree/11.ipynb?token={token}"
    finally:  # the server and its kernels share the session started for it: kill them by its PID
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
        assert proc.poll() is not None


def test_notebook_11_slider_answers_in_jupyterlab(lab):
    from playwright.sync_api import expect, sync_playwright

    SHOT_DIR.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = None
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(lab, timeout=90_000)
            page.locator(".jp-Notebook").first.wait_for(timeout=90_000)
            # JupyterLab may ask which kernel to start (a race with the session it restores): take the default
            _accept_kernel_dialog(page)
            expect(page.locator("#jp-main-statusbar")).to_contain_text("Idle", timeout=90_000)  # the kernel is up
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).first.click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).first.click()
            _accept_kernel_dialog(page)

            status = page.locator(".unclip-interpolation-status")
            expect(status).to_contain_text("θ = 0.50", timeout=300_000)  # the whole notebook runs first
            image = page.locator(".unclip-interpolation-image")
            before = image.get_attribute("src")
            assert before and (before.startswith("blob:") or before.startswith("data:")), before

            handle = page.locator(".unclip-interpolation-theta .noUi-handle")
            handle.scroll_into_view_if_needed()
            handle.focus()
            for _ in range(3):  # three steps of 0.05
                page.keyboard.press("ArrowRight")
            expect(status).to_contain_text("θ = 0.65", timeout=60_000)
            expect(image).not_to_have_attribute("src", before, timeout=30_000)
            text = status.inner_text()
            assert re.search(r"θ = 0\.65 · x_T fixed · \d+\.\d+ s", text), text
            status.scroll_into_view_if_needed()
            page.screenshot(path=str(SHOT_DIR / "11_edits_interpolations.png"), full_page=False)
        except Exception:
            if page is not None:
                page.screenshot(path=str(SHOT_DIR / "failure.png"), full_page=False)  # what the browser showed
            raise
        finally:
            browser.close()
    assert (SHOT_DIR / "11_edits_interpolations.png").stat().st_size > 10_000
