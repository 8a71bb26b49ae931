"""No one in: a real server (`python -m studio ui --auth ...`) serves files from its workspace
and nothing else, whatever the route or the spelling of the path; the page and the API ask
for the login; uploads over the size limit are refused."""
from __future__ import annotations

import http.client
import os
import urllib.parse
import uuid
from pathlib import Path

import httpx
import pytest

from tests.live_server import API, ROOT, Api, running_server

pytestmark = pytest.mark.slow

USER, PASSWORD = "ops", "correct-horse-42"
LIMIT_MB = 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("security")
    workspace, outside, uploads = base / "ws", base / "outside", base / "gradio-tmp"
    outside.mkdir()
    secret = f"SECRET-{uuid.uuid4().hex}"
    (outside / "secret.txt").write_text(secret)
    (outside / "secret.png").write_text(secret)  # a served type: refused for where it is, not what it is
    workspace.mkdir()
    (workspace / "inside.txt").write_text("INSIDE-OK")
    (workspace / "link.txt").symlink_to(outside / "secret.txt")
    (workspace / "linkdir").symlink_to(outside, target_is_directory=True)
    env = {"LORA_STUDIO_MAX_UPLOAD_MB": str(LIMIT_MB), "GRADIO_TEMP_DIR": str(uploads)}
    with running_server(workspace, "--auth", f"{USER}:{PASSWORD}", env=env) as live:
        yield {"live": live, "ws": live.workspace, "outside": outside, "secret": secret, "uploads": uploads}


@pytest.fixture(scope="module")
def api(server):
    client = Api(server["live"].url, auth=(USER, PASSWORD))
    yield client
    client.close()


def raw_get(url: str, path: str, cookies: dict, method: str = "GET") -> tuple[int, bytes]:
    """Send `path` exactly as written (httpx would normalise `..` away before sending)."""
    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
    cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
    conn.request(method, path, headers={"Cookie": cookie} if cookie else {})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def attempts(ws: Path, target: Path) -> list[str]:
    """Ways to ask for `target` (a file outside the workspace) through every file route."""
    t = str(target)
    up = "../" * 12
    rel_from_ws = os.path.relpath(target, ws)
    enc = lambda s: s.replace(".", "%2e").replace("/", "%2f")  # noqa: E731
    paths = [
        f"{API}/file={t}", f"{API}/file/{t}", f"/file={t}", f"{API}/file={enc(t)}",
        f"{API}/file={ws}/{rel_from_ws}", f"{API}/file={ws}/{enc(rel_from_ws)}",
        f"{API}/file={ws}%2f{enc(rel_from_ws)}", f"{API}/file={ws}/{rel_from_ws.replace('..', '%252e%252e')}",
        f"{API}/file={ws}\\..\\{rel_from_ws}", f"{API}/file={up}{t.lstrip('/')}", f"{API}/file=/{t}",
        f"{API}/file=file://{t}", f"{API}/file={ws}/inside.txt%00/../{rel_from_ws}",
        f"/static/{up}{t.lstrip('/')}", f"/static/{enc(up)}{t.lstrip('/')}", f"/assets/{enc(up)}{t.lstrip('/')}",
        f"{API}/static/{enc(up)}{t.lstrip('/')}", f"/{up}{t.lstrip('/')}", f"/{enc(up)}{t.lstrip('/')}",
        f"{API}/proxy=file://{t}", f"{API}/file={ws}/linkdir/{target.name}",
    ]
    try:
        paths.append(f"{API}/file={os.path.relpath(target, ROOT)}")  # relative to the server's folder
    except ValueError:
        pass
    return paths


def assert_refused(live_url: str, path: str, content: bytes, cookies: dict) -> None:
    for method in ("GET", "HEAD"):
        status, body = raw_get(live_url, path, cookies, method)
        assert 400 <= status < 500, f"{method} {path} -> {status}"
        assert content not in body, f"{method} {path} leaked the file"


def test_workspace_file_is_served(server, api):
    """The positive control: without it every refusal below could be a broken route."""
    ws = server["ws"]
    status, body = raw_get(api.url, f"{API}/file={ws}/inside.txt", dict(api.http.cookies))
    assert (status, body) == (200, b"INSIDE-OK")


@pytest.mark.parametrize("which", ["outside", "symlink", "etc", "repo"])
def test_traversal_is_refused_everywhere(server, api, which):
    ws, outside, cookies = server["ws"], server["outside"], dict(api.http.cookies)
    if which == "outside":
        target, content = outside / "secret.txt", server["secret"].encode()
        paths = attempts(ws, target) + attempts(ws, outside / "secret.png")
    elif which == "symlink":  # links inside the workspace that point out of it
        content = server["secret"].encode()
        paths = [f"{API}/file={ws}/link.txt", f"{API}/file={ws}/linkdir/secret.txt",
                 f"{API}/file={ws}/linkdir/secret.png", f"{API}/file={ws}/linkdir/../linkdir/secret.txt"]
    elif which == "etc":
        content = b"root:"
        paths = attempts(ws, Path("/etc/passwd"))
    else:  # the project itself sits outside the workspace
        content = b'name = "lora-studio"'
        paths = attempts(ws, ROOT / "pyproject.toml")
    for path in paths:
        assert_refused(api.url, path, content, cookies)


def test_api_inputs_cannot_name_server_files(server, api):
    """A client may not pass a server path as an uploaded file (library or dataset import)."""
    ws, outside = server["ws"], server["outside"]
    for path in [str(outside / "secret.png"), f"{ws}/link.txt", f"{ws}/../outside/secret.png", "/etc/passwd"]:
        file = {"path": path, "orig_name": "x.safetensors", "meta": {"_type": "gradio.FileData"}}
        result = api.call("import_adapter", {"lib-upload": file, "lib-new-name": "stolen"})
        assert result.output is None and result.error is not None, result
        result = api.call("import_dataset", {"ds-new-name": "stolen", "ds-upload": [{**file, "orig_name": "x.png"}]})
        assert result.output is None and result.error is not None, result
        assert server["secret"] not in str(result) and "root:" not in str(result)
    assert not (ws / "adapters" / "stolen.safetensors").exists()
    assert not (ws / "datasets" / "stolen").exists()


def test_upload_names_cannot_escape(server, api):
    uploads, outside = server["uploads"], server["outside"]
    names = [str(outside / "evil-abs.txt"), "../" * 12 + str(outside / "evil-rel.txt").lstrip("/"),
             "..\\..\\..\\evil-win.txt", "%2e%2e%2fevil-enc.txt"]
    for name in names:
        response = api.http.post(api.url + f"{API}/upload", files={"files": (name, b"payload")})
        assert response.status_code == 200, response.text
        stored = Path(response.json()[0]).resolve()
        assert stored.is_relative_to(uploads.resolve()), stored
    assert not list(outside.glob("evil*")) and not list(uploads.parent.glob("evil*"))


def test_upload_over_the_limit_is_refused(server, api):
    uploads = server["uploads"]
    small = api.http.post(api.url + f"{API}/upload", files={"files": ("small.png", b"x" * 1000)})
    assert small.status_code == 200
    big = api.http.post(api.url + f"{API}/upload",
                        files={"files": ("big-upload.png", b"x" * (LIMIT_MB * 1024**2 + 200_000))})
    assert big.status_code == 413, (big.status_code, big.text)
    assert not list(uploads.rglob("big-upload*"))
    assert server["live"].alive()


def test_login_is_required(server):
    live, ws = server["live"], server["ws"]
    anonymous = httpx.Client(timeout=30)
    page = anonymous.get(live.url + "/")
    assert page.status_code in (200, 302, 303, 307, 401)
    assert str(ws) not in page.text and "LoRA Studio</h1>" not in page.text  # only the login form
    for path in ["/config", f"{API}/info", f"{API}/file={ws}/inside.txt", f"{API}/upload"]:
        response = anonymous.request("POST" if path.endswith("upload") else "GET", live.url + path)
        assert response.status_code == 401, (path, response.status_code)
        assert b"INSIDE-OK" not in response.content
    join = anonymous.post(live.url + f"{API}/queue/join", json={"data": [], "fn_index": 0, "session_hash": "x"})
    assert join.status_code == 401
    bad = anonymous.post(live.url + "/login", data={"username": USER, "password": "wrong-password"})
    assert bad.status_code >= 400
    assert anonymous.get(live.url + "/config").status_code == 401

    logged_in = Api(live.url, auth=(USER, PASSWORD))  # the same calls work with the login
    assert str(ws) in str(logged_in.config)
    result = logged_in.call("generate", {"gen-prompt": "a star", "gen-steps": 1, "gen-seed": 3})
    assert result.error is None and not result.warnings and result.output[0], result
    image = result.output[0][0]["image"]["url"]
    assert logged_in.http.get(image).status_code == 200
    assert anonymous.get(image).status_code == 401
