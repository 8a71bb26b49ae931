"""A real studio server (`python -m studio ui`) in a subprocess, and a small client for
Gradio's HTTP API that also collects the warnings our `friendly` wrapper shows.

Used by the concurrency, security and bad-input tests. The client speaks the same queue
protocol as the page (`/gradio_api/queue/join` + the `/queue/data` event stream), so a
handled error arrives as a `log` message of level "warning", exactly what a person sees.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90
API = "/gradio_api"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_workspace_processes(workspace: Path) -> None:
    """End the detached supervisor (and any worker) that this test's server started, by pid."""
    import sqlite3

    pids = []
    with contextlib.suppress(Exception):
        pids.append(json.loads((workspace / "supervisor.lock").read_text())["pid"])
    with contextlib.suppress(Exception):
        with contextlib.closing(sqlite3.connect(workspace / "studio.db")) as conn:
            pids += [row[0] for row in conn.execute("SELECT pid FROM jobs WHERE pid IS NOT NULL")]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError, TypeError, ValueError):
            os.kill(int(pid), signal.SIGTERM)


@dataclass
class Server:
    url: str
    workspace: Path
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")
        return ""


@contextlib.contextmanager
def running_server(workspace: Path, *args: str, env: dict | None = None, meanwhile=None):
    """Start `python -m studio ui --workspace WORKSPACE --port FREE [args]` and stop it after;
    `meanwhile()` runs while the server starts up (it takes a while to import Gradio)."""
    workspace.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workspace.parent / f"server-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
                "OMP_NUM_THREADS": "1", **(env or {})}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "studio", "ui", "--workspace", str(workspace),
                                 "--port", str(port), *args], cwd=ROOT, env=full_env, stdout=log,
                                stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", workspace, proc, log_path)
    try:
        if meanwhile is not None:
            meanwhile()
        _wait_listening(server)
        yield server
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_workspace_processes(workspace)


def _wait_listening(server: Server) -> None:
    deadline = time.time() + START_TIMEOUT_S
    while time.time() < deadline:
        if not server.alive():
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n{server.log_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(server.url + "/", timeout=2).status_code in (200, 401):
                return
        time.sleep(0.25)
    raise TimeoutError(f"{server.url} did not answer in {START_TIMEOUT_S} s")


@dataclass
class Result:
    """One handler call: its outputs (None when it failed or raised), the warnings and
    infos it showed as (title, message), and Gradio's error text if it failed."""

    output: list | None
    output_types: list[str] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def warning_text(self) -> str:
        return "\n".join(f"{title}: {message}" for title, message in self.warnings)

    @property
    def skipped(self) -> bool:
        """True when every output was left as it was (`friendly` returned gr.skip()); a
        gr.State never travels to the client, so its value is always None here."""
        return self.output is not None and all(
            kind == "state" or (isinstance(v, dict) and v.get("__type__") == "update" and len(v) == 1)
            for v, kind in zip(self.output, self.output_types, strict=True))


class Api:
    """Gradio's HTTP API as the page uses it. Inputs not given take the page's initial
    values, so a call names only what it changes: `api.call("generate", {"gen-seed": 3})`."""

    def __init__(self, url: str, *, auth: tuple[str, str] | None = None, timeout: float = 180):
        self.url = url.rstrip("/")
        self.http = httpx.Client(timeout=timeout, follow_redirects=False)
        if auth:
            response = self.http.post(self.url + "/login", data={"username": auth[0], "password": auth[1]})
            response.raise_for_status()
        config = self.http.get(self.url + "/config")
        config.raise_for_status()
        self.config = config.json()
        self.components = {c["id"]: c for c in self.config["components"]}
        self.by_elem = {c["props"].get("elem_id"): c["id"] for c in self.config["components"]
                        if c["props"].get("elem_id")}
        self.by_label = {}
        for c in self.config["components"]:
            self.by_label.setdefault(c["props"].get("label"), c["id"])
        self.endpoints = {d["api_name"]: d for d in self.config["dependencies"] if d.get("api_name")}

    def close(self) -> None:
        self.http.close()

    def _component_id(self, key) -> int:
        if isinstance(key, int):
            return key
        if key in self.by_elem:
            return self.by_elem[key]
        return self.by_label[key]

    def call(self, api_name: str, values: dict | None = None, *, timeout: float = 300) -> Result:
        dep = self.endpoints[api_name]
        given = {self._component_id(k): v for k, v in (values or {}).items()}
        unknown = set(given) - set(dep["inputs"])
        assert not unknown, f"{api_name} has no inputs {unknown}"
        data = [given[i] if i in given else self.components[i]["props"].get("value") for i in dep["inputs"]]
        session = uuid.uuid4().hex[:11]  # one page session per call: calls may run in parallel
        body = {"data": data, "fn_index": dep["id"], "session_hash": session, "event_data": None,
                "trigger_id": dep["targets"][0][0] if dep["targets"] else None}
        # json.dumps writes NaN / Infinity as Python's json (the server's parser) reads them
        join = self.http.post(self.url + f"{API}/queue/join", content=json.dumps(body),
                              headers={"Content-Type": "application/json"})
        join.raise_for_status()
        event_id = join.json()["event_id"]
        return self._collect(session, event_id, timeout,
                             [self.components[i]["type"] for i in dep["outputs"]])

    def _collect(self, session: str, event_id: str, timeout: float, output_types: list[str]) -> Result:
        result = Result(None, output_types)
        with self.http.stream("GET", self.url + f"{API}/queue/data", params={"session_hash": session},
                              timeout=timeout) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") not in (event_id, None):
                    continue
                kind = msg.get("msg")
                if kind == "log":
                    if msg.get("level") == "warning":
                        result.warnings.append((msg.get("title") or "", msg.get("log") or ""))
                    else:
                        result.infos.append(msg.get("log") or "")
                elif kind == "process_completed":
                    if msg.get("success"):
                        result.output = msg["output"]["data"]
                    else:
                        error = (msg.get("output") or {}).get("error")
                        result.error = str(error) if error else "failed (the reason is only in the server's log)"
                    return result
                elif kind == "unexpected_error":
                    result.error = str(msg.get("message"))
                    return result
        result.error = result.error or "the event stream ended without a result"
        return result

    def upload(self, path: Path) -> dict:
        """Upload a file as the page does; returns the FileData to pass as an input value."""
        with open(path, "rb") as handle:
            response = self.http.post(self.url + f"{API}/upload", files={"files": (path.name, handle)})
        response.raise_for_status()
        server_path = response.json()[0]
        return {"path": server_path, "orig_name": path.name, "size": path.stat().st_size,
                "meta": {"_type": "gradio.FileData"}}
