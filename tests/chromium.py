"""Headless Chromium driven over the DevTools protocol on a pipe (no network, no websocket).

``--remote-debugging-pipe`` makes Chromium read NUL-terminated JSON commands on fd 3 and
write replies and events on fd 4, so the standard library is enough.

    with Chromium(profile_dir) as browser:
        browser.open("file:///.../index.html", width=1200, height=1600)
        value = browser.evaluate("(async () => 1 + 1)()")
        png = browser.screenshot()
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--mute-audio",
         "--remote-debugging-pipe"]


def executable() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _high(fd: int) -> int:
    """The same pipe end on a descriptor above 10, so dup2 onto 3 and 4 cannot clobber it."""
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Chromium:
    def __init__(self, profile_dir, *, timeout: float = 90.0) -> None:
        self.timeout = timeout
        self.profile_dir = str(profile_dir)
        self._id = 0
        self._buffer = b""
        self.events: list[dict] = []
        self.session: str | None = None

    def __enter__(self) -> Chromium:
        command_read, self._command_write = map(_high, os.pipe())
        self._reply_read, reply_write = map(_high, os.pipe())

        def wire():  # runs in the child before exec
            os.dup2(command_read, 3)
            os.dup2(reply_write, 4)

        self.process = subprocess.Popen(
            [executable(), *FLAGS, f"--user-data-dir={self.profile_dir}", "about:blank"],
            preexec_fn=wire, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL)
        os.close(command_read)
        os.close(reply_write)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._send("Browser.close", session=False)
        except Exception:
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=20)
        os.close(self._command_write)
        os.close(self._reply_read)

    # --- the protocol

    def _send(self, method: str, params: dict | None = None, *, session: bool = True) -> int:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self._command_write, json.dumps(message).encode() + b"\0")
        return self._id

    def _next_message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or self.process.poll() is not None:
                raise TimeoutError("Chromium did not answer in time")
            ready, _, _ = select.select([self._reply_read], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(self._reply_read, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed its DevTools pipe")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, params: dict | None = None, *, session: bool = True) -> dict:
        wanted = self._send(method, params, session=session)
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._next_message(deadline)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_event(self, method: str) -> dict:
        deadline = time.monotonic() + self.timeout
        for index, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(index)
        while True:
            message = self._next_message(deadline)
            if message.get("method") == method:
                return message
            self.events.append(message)

    # --- what tests use

    def open(self, url: str, *, width: int, height: int) -> None:
        target = self.call("Target.createTarget", {"url": "about:blank"}, session=False)
        attached = self.call("Target.attachToTarget",
                             {"targetId": target["targetId"], "flatten": True}, session=False)
        self.session = attached["sessionId"]
        self.call("Page.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        self.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self) -> bytes:
        shot = self.call("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(shot["data"])
