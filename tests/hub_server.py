"""A stand-in for the Hugging Face Hub and CivitAI on the loopback (127.0.0.1 only), speaking
the HTTP their clients use, for tests of pulling models by name (studio.models.hub).

Two servers, as on the real sites: the "hub" (its API and the file addresses) and the
"storage" it redirects large files to (another port, so another origin: huggingface_hub
reads a large file's metadata from the redirect itself and sends no token there).

Hugging Face (what huggingface_hub 2.x calls; read from its source):
    GET  /api/models/{repo}/revision/{rev}          {"id", "sha", "siblings"}
    GET  /api/models/{repo}/tree/{rev}[/{path}]     [{"type", "path", "oid", "size", "lfs"}] (recursive)
    POST /api/models/{repo}/paths-info/{rev}        the same entries for the form's `paths`
    HEAD/GET /{repo}/resolve/{rev}/{path}           small files: 200, ETag = git blob id,
        X-Repo-Commit, Range; LFS files: 302 to storage with X-Linked-Etag (sha256),
        X-Linked-Size, X-Repo-Commit
    errors carry X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound); a private
    repo answers 401 without `Authorization: Bearer TOKEN`.
CivitAI:
    GET /api/v1/model-versions/{id}                 {"id", "modelId", "model": {"type"}, "files": [...]}
    GET /api/download/models/{id}?type=&format=     307 to storage (401 without the token when one is set)
Storage:
    GET/HEAD /blobs/{sha256}                        the bytes, with Range and Content-Disposition

`drop_once` cuts a blob's first transfer after so many bytes (the connection closes), `wrong_sha256`
advertises another hash for a blob; `requests` logs (server, method, path, Range, Authorization).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".onnx", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".png")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    private: bool = False


@dataclass
class CivitaiFile:
    name: str
    data: bytes
    format: str = "SafeTensor"   # or PickleTensor
    type: str = "Model"


@dataclass
class CivitaiVersion:
    model_type: str              # LORA, LoCon, Checkpoint, TextualInversion, ...
    files: list[CivitaiFile]
    model_id: int = 1000


@dataclass
class StandIn:
    repos: dict[str, Repo] = field(default_factory=dict)
    civitai: dict[int, CivitaiVersion] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    drop_once: dict[str, int] = field(default_factory=dict)  # sha256 of a blob -> bytes its first GET sends
    wrong_sha256: set[str] = field(default_factory=set)  # sha256 of blobs advertised with another hash
    token: str | None = None                             # what private repos and CivitAI downloads need
    requests: list[tuple[str, str, str, str | None, str | None]] = field(default_factory=list)
    hub_url: str = ""
    storage_url: str = ""

    # ----------------------------------------------------------------- content
    def add_repo(self, repo: str, files: dict[str, bytes] | Path, *, private: bool = False) -> Repo:
        if isinstance(files, Path):
            files = {p.relative_to(files).as_posix(): p.read_bytes() for p in sorted(files.rglob("*")) if p.is_file()}
        blob_ids = "".join(git_blob_id(files[path]) for path in sorted(files))
        commit = hashlib.sha1((repo + blob_ids).encode()).hexdigest()
        self.repos[repo] = Repo(dict(files), commit, private)
        for path, data in files.items():
            if path.endswith(LFS_SUFFIXES):
                self.blobs[sha256_hex(data)] = data
        return self.repos[repo]

    def add_civitai(self, version: int, model_type: str, files: list[CivitaiFile]) -> None:
        self.civitai[version] = CivitaiVersion(model_type, files)
        for item in files:
            self.blobs[sha256_hex(item.data)] = item.data

    def advertised(self, data: bytes) -> str:
        real = sha256_hex(data)
        return sha256_hex(data + b"!") if real in self.wrong_sha256 else real

    def requested(self, server: str, path_part: str) -> list:
        return [r for r in self.requests if r[0] == server and path_part in r[2]]

    # ----------------------------------------------------------------- serving
    @contextlib.contextmanager
    def serving(self):
        hub = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "hub"))
        storage = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, "storage"))
        self.hub_url = f"http://127.0.0.1:{hub.server_address[1]}"
        self.storage_url = f"http://127.0.0.1:{storage.server_address[1]}"
        threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (hub, storage)]
        for thread in threads:
            thread.start()
        try:
            yield self
        finally:
            for server in (hub, storage):
                server.shutdown()
                server.server_close()


def _handler(stand_in: StandIn, role: str):
    class Handler(_Handler):
        site, kind = stand_in, role

    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    site: StandIn
    kind: str

    def log_message(self, *args) -> None:  # quiet
        return None

    # ----------------------------------------------------------------- plumbing
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, value, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str | None = None) -> None:
        self._json({"error": code or "error"}, status, {"X-Error-Code": code} if code else None)

    def _authorised(self) -> bool:
        return self.site.token is None or self.headers.get("Authorization") == f"Bearer {self.site.token}"

    def _serve_bytes(self, data: bytes, headers: dict, *, drop: int | None = None) -> None:
        """The bytes (or the part a Range asks for); `drop`: close the connection after that many."""
        start, status = 0, 200
        asked = self.headers.get("Range", "")
        if asked.startswith("bytes="):
            first = asked[len("bytes="):].split("-", 1)[0]
            start = int(first) if first.isdigit() else 0
            if start >= len(data):
                self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"}
        body = data[start:]
        self.send_response(status)
        for key, value in {"Accept-Ranges": "bytes", **headers}.items():
            self.send_header(key, str(value))
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if drop is not None:
            self.wfile.write(body[:drop])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def _route(self) -> None:
        parts = urlsplit(self.path)
        self.site.requests.append((self.kind, self.command, parts.path, self.headers.get("Range"),
                                   self.headers.get("Authorization")))
        segments = [unquote(s) for s in parts.path.split("/")[1:]]
        query = parse_qs(parts.query)
        if self.kind == "storage":
            return self._storage(segments)
        if segments[:3] == ["api", "v1", "model-versions"] and len(segments) == 4:
            return self._civitai_version(segments[3])
        if segments[:3] == ["api", "download", "models"] and len(segments) == 4:
            return self._civitai_download(segments[3], query)
        if segments[:2] == ["api", "models"] and len(segments) >= 5:
            return self._hf_api(segments[2:])
        if len(segments) >= 5 and segments[2] == "resolve":
            return self._hf_resolve("/".join(segments[:2]), segments[3], "/".join(segments[4:]))
        self._error(404)

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._route()

    def do_HEAD(self) -> None:  # noqa: N802
        self._route()

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length") or 0)
        self.form = parse_qs(self.rfile.read(length).decode())
        self._route()

    # ----------------------------------------------------------------- storage
    def _storage(self, segments: list[str]) -> None:
        if len(segments) != 2 or segments[0] != "blobs" or segments[1] not in self.site.blobs:
            return self._error(404)
        sha = segments[1]
        drop = self.site.drop_once.pop(sha, None) if self.command == "GET" else None
        name = parse_qs(urlsplit(self.path).query).get("name", [""])[0]
        headers = {"ETag": f'"{sha}"', "Content-Type": "application/octet-stream"}
        if name:
            headers["Content-Disposition"] = f'attachment; filename="{name}"'
        self._serve_bytes(self.site.blobs[sha], headers, drop=drop)

    # ----------------------------------------------------------------- Hugging Face
    def _repo(self, repo: str, revision: str) -> Repo | None:
        found = self.site.repos.get(repo)
        if found is None:
            self._error(404, "RepoNotFound")
            return None
        if found.private and not self._authorised():
            self._error(401)
            return None
        if revision not in ("main", found.commit):
            self._error(404, "RevisionNotFound")
            return None
        return found

    def _entries(self, repo: Repo, paths) -> list[dict]:
        out, folders = [], set()
        for path in paths:
            data = repo.files[path]
            entry = {"type": "file", "path": path, "oid": git_blob_id(data), "size": len(data)}
            if path.endswith(LFS_SUFFIXES):
                entry["lfs"] = {"oid": self.site.advertised(data), "size": len(data), "pointerSize": 134}
            out.append(entry)
            parent = path.rpartition("/")[0]
            while parent and parent not in folders:
                folders.add(parent)
                out.append({"type": "directory", "path": parent, "oid": "0" * 40})
                parent = parent.rpartition("/")[0]
        return out

    def _hf_api(self, rest: list[str]) -> None:
        repo_name, action = "/".join(rest[:2]), rest[2]
        revision = rest[3] if len(rest) > 3 else "main"
        repo = self._repo(repo_name, revision)
        if repo is None:
            return
        if action == "revision":
            return self._json({"id": repo_name, "sha": repo.commit, "private": repo.private,
                               "siblings": [{"rfilename": p} for p in sorted(repo.files)]})
        if action == "tree":
            under = "/".join(rest[4:])
            paths = [p for p in sorted(repo.files) if not under or p.startswith(under + "/")]
            return self._json(self._entries(repo, paths))
        if action == "paths-info":
            wanted = [p for p in getattr(self, "form", {}).get("paths", []) if p in repo.files]
            return self._json(self._entries(repo, wanted))
        self._error(404)

    def _hf_resolve(self, repo_name: str, revision: str, path: str) -> None:
        repo = self._repo(repo_name, revision)
        if repo is None:
            return
        if path not in repo.files:
            return self._error(404, "EntryNotFound")
        data = repo.files[path]
        common = {"X-Repo-Commit": repo.commit, "ETag": f'"{git_blob_id(data)}"'}
        if path.endswith(LFS_SUFFIXES):
            location = f"{self.site.storage_url}/blobs/{sha256_hex(data)}?name={quote(path.rsplit('/', 1)[-1])}"
            return self._send(302, b"", {**common, "Location": location, "X-Linked-Size": len(data),
                                         "X-Linked-Etag": f'"{self.site.advertised(data)}"'})
        self._serve_bytes(data, common)

    # ----------------------------------------------------------------- CivitAI
    def _civitai_version(self, version_text: str) -> None:
        version = self.site.civitai.get(int(version_text)) if version_text.isdigit() else None
        if version is None:
            return self._json({"error": "No model with id " + version_text}, 404)
        files = [{"id": i, "name": f.name, "sizeKB": len(f.data) / 1024, "type": f.type, "primary": i == 0,
                  "metadata": {"format": f.format, "size": "pruned", "fp": "fp16"},
                  "hashes": {"SHA256": self.site.advertised(f.data).upper()},
                  "downloadUrl": f"{self.site.hub_url}/api/download/models/{version_text}?type={quote(f.type)}"
                                 f"&format={f.format}"}
                 for i, f in enumerate(version.files)]
        self._json({"id": int(version_text), "modelId": version.model_id, "name": "v1",
                    "model": {"name": "stand-in", "type": version.model_type, "nsfw": False}, "files": files})

    def _civitai_download(self, version_text: str, query: dict) -> None:
        version = self.site.civitai.get(int(version_text)) if version_text.isdigit() else None
        if version is None:
            return self._error(404)
        if not self._authorised():
            return self._json({"error": "Unauthorized"}, 401)
        chosen = [f for f in version.files if f.type == query.get("type", ["Model"])[0]
                  and f.format == query.get("format", [f.format])[0]] or version.files
        item = chosen[0]
        self._send(307, b"", {"Location": f"{self.site.storage_url}/blobs/{sha256_hex(item.data)}"
                                          f"?name={quote(item.name)}"})
