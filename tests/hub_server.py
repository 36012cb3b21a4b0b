"""A small Hugging Face Hub server for tests: the HTTP protocol that `huggingface_hub` 2.4 and transformers 5.x speak,
served from memory on 127.0.0.1, so that pushes and pulls run end to end with the real clients and no internet.

Endpoints (model, dataset and space repos; `{repo}` is `namespace/name` or a bare `name`):

    GET  /api/whoami-v2                                     the user "tester" (401 without a token)
    POST /api/repos/create        {name, organization, type} 200 {url}; 409 {url, error} when it exists
    POST /api/repos/delete        {name, organization, type} 200; 404 RepoNotFound
    POST /api/validate-yaml       {content, repoType}        README front matter must parse as a YAML mapping
    GET  /api/{type}s/{repo}[/revision/{rev}]               repo info with sha and siblings
    GET  /api/{type}s/{repo}/tree/{rev}[/{path}]            files and folders, `recursive=true` for the subtree
    POST /api/{type}s/{repo}/preupload/{rev}                every file "regular" (inline base64 in the commit), with
                                                            the oid of the file already there, so unchanged files
                                                            are dropped by the client
    POST /api/{type}s/{repo}/commit/{rev}                   NDJSON: header, file (base64), deletedFile, deletedFolder
    POST /api/{type}s/{repo}/branch/{name}                  new branch from `startingPoint` or the default branch
    HEAD/GET /[{type}s/]{repo}/resolve/{rev}/{path}         bytes with ETag (git blob sha1), X-Repo-Commit,
                                                            Content-Length; `Range: bytes=a-b` answers 206

Errors carry the headers the client maps to exceptions: `X-Error-Code: RepoNotFound` (401 without a token, 404 with
one, as the Hub answers), `RevisionNotFound` (404) and `EntryNotFound` (404, with `X-Repo-Commit` so the client can
cache the absence). Writes need an `Authorization: Bearer ...` header. Anything else is answered 501 and recorded in
`HubServer.unhandled`, so a test can assert that the clients asked for nothing this server does not implement.

Run it standalone with `python tests/hub_server.py [--port 8765]`, then point clients at it with
`HF_ENDPOINT=http://127.0.0.1:8765`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


logger = logging.getLogger("hub_server")

DEFAULT_NAMESPACE = "tester"
DEFAULT_BRANCH = "main"
REPO_TYPES = ("model", "dataset", "space")
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def git_blob_sha1(data: bytes) -> str:
    """The id git gives a blob: sha1 of `blob <size>\\0<content>` (the Hub's ETag and tree `oid` of a regular file)."""
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]  # the full snapshot: path -> content
    parent: str | None
    title: str
    description: str
    created: float


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    created: float = field(default_factory=time.time)

    def resolve(self, revision: str) -> Commit:
        revision = unquote(revision)
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if _SHA_RE.match(revision) and revision in self.commits:
            return self.commits[revision]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


class HubServer:
    """The in-memory store plus the HTTP server; `start()` serves from a daemon thread on a free port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, user: str = DEFAULT_NAMESPACE):
        self.user = user
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of every request
        self.unhandled: list[tuple[str, str]] = []
        self.auth_headers: set[str] = set()
        self._counter = 0
        self.httpd = ThreadingHTTPServer((host, port), _make_handler(self))
        self.httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hub-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- inspection helpers for tests ----------------------------------------------------------------------------
    def get_repo(self, repo_id: str, repo_type: str = "model") -> Repo | None:
        with self.lock:
            return self.repos.get((repo_type, self._canonical(repo_id)))

    def files(self, repo_id: str, revision: str = DEFAULT_BRANCH, repo_type: str = "model") -> dict[str, bytes]:
        """The files of a repo at a revision (path -> bytes); empty if the repo does not exist."""
        repo = self.get_repo(repo_id, repo_type)
        if repo is None:
            return {}
        with self.lock:
            return dict(repo.resolve(revision).files)

    def all_stored_files(self) -> dict[str, bytes]:
        """Every file of every commit of every repo, as `type:repo@commit:path` -> bytes."""
        out = {}
        with self.lock:
            for (repo_type, repo_id), repo in self.repos.items():
                for oid, commit in repo.commits.items():
                    for path, data in commit.files.items():
                        out[f"{repo_type}:{repo_id}@{oid}:{path}"] = data
        return out

    # ---- store ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _canonical(repo_id: str) -> str:
        return repo_id if "/" in repo_id else f"{DEFAULT_NAMESPACE}/{repo_id}"

    def _new_oid(self, *parts: str) -> str:
        with self.lock:
            self._counter += 1
            seed = "\x00".join((str(self._counter), repr(time.time()), *parts))
        return hashlib.sha1(seed.encode()).hexdigest()

    def repo(self, repo_type: str, repo_id: str, authorized: bool) -> Repo:
        with self.lock:
            repo = self.repos.get((repo_type, self._canonical(repo_id)))
        if repo is None or (repo.private and not authorized):
            # The Hub does not reveal whether a repo exists: 401 to anonymous callers, 404 to authenticated ones.
            raise HubError(404 if authorized else 401, "Repository not found", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, namespace: str | None, name: str, private: bool) -> tuple[Repo, bool]:
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        namespace = namespace or self.user
        for part in (namespace, name):
            if not _NAME_RE.match(part or "") or ".." in part:
                raise HubError(400, f"Invalid repo name {namespace}/{name}")
        repo_id = f"{namespace}/{name}"
        with self.lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                return self.repos[key], False
            repo = Repo(repo_type, repo_id, private)
            oid = self._new_oid(repo_type, repo_id, "initial commit")
            repo.commits[oid] = Commit(oid, {".gitattributes": GITATTRIBUTES}, None, "initial commit", "", time.time())
            repo.branches[DEFAULT_BRANCH] = oid
            self.repos[key] = repo
            return repo, True

    def commit(self, repo: Repo, revision: str, lines: list[dict]) -> Commit:
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0].get("value") or {}
        revision = unquote(revision)
        with self.lock:
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision} (commits go to branches)", "RevisionNotFound")
            head = repo.commits[repo.branches[revision]]
            parent = header.get("parentCommit")
            if parent and not head.oid.startswith(parent):
                raise HubError(412, f"Parent commit {parent} is not the head of {revision} ({head.oid})")
            files = dict(head.files)
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value") or {}
                path = value.get("path", "")
                if key in ("file", "deletedFile", "deletedFolder", "lfsFile") and not _valid_path(path):
                    raise HubError(400, f"Invalid path in commit: {path!r}")
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, f"Unsupported encoding {value.get('encoding')!r}")
                    files[path] = base64.b64decode(value.get("content", ""), validate=True)
                elif key == "deletedFile":
                    if path not in files:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    del files[path]
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in files if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del files[p]
                elif key == "lfsFile":
                    raise HubError(400, "this test server stores no LFS objects; its preupload answers 'regular'")
                else:
                    raise HubError(400, f"Unsupported commit operation {key!r}")
            title = str(header.get("summary") or "").strip()
            if not title:
                raise HubError(400, "A commit needs a summary")
            oid = self._new_oid(repo.repo_id, head.oid, title)
            commit = Commit(oid, files, head.oid, title, str(header.get("description") or ""), time.time())
            repo.commits[oid] = commit
            repo.branches[revision] = oid
            return commit


def _valid_path(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts) and \
        ".git" not in parts


def _truthy(values: list[str] | None) -> bool:
    return bool(values) and values[-1].lower() in ("1", "true", "yes")


def _card_data(readme: bytes | None) -> dict | None:
    """The YAML front matter of a README as a dict (None if absent or invalid)."""
    if not readme:
        return None
    import yaml

    text = readme.decode("utf-8", errors="replace")
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _make_handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: every answer carries Content-Length
        server_version = "dlm-test-hub/1"

        def log_message(self, format, *args):  # noqa: A002 (the stdlib's signature)
            logger.debug("%s - %s", self.address_string(), format % args)

        # ---- plumbing -------------------------------------------------------------------------------------------
        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _json_body(self) -> dict:
            raw = self._body()
            try:
                return json.loads(raw or b"{}")
            except json.JSONDecodeError as err:
                raise HubError(400, f"invalid JSON body: {err}") from None

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
                  content_type: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD" and body:
                self.wfile.write(body)
            with hub.lock:
                hub.requests.append((self.command, self.path, status))

        def _send_json(self, status: int, payload, headers: dict | None = None) -> None:
            self._send(status, json.dumps(payload).encode(), headers)

        def _authorized(self) -> bool:
            value = self.headers.get("Authorization", "")
            if value:
                with hub.lock:
                    hub.auth_headers.add(value)
            return value.startswith("Bearer ") and len(value) > len("Bearer ")

        def _need_auth(self) -> None:
            if not self._authorized():
                raise HubError(401, "Invalid credentials in Authorization header")

        def _dispatch(self, routes) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            segments = [s for s in url.path.split("/") if s]
            try:
                for route in routes:
                    if route(segments, query):
                        return
                with hub.lock:
                    hub.unhandled.append((self.command, self.path))
                raise HubError(501, f"{self.command} {url.path} is not implemented by the test hub")
            except HubError as err:
                headers = dict(err.headers)
                if err.code:
                    headers["X-Error-Code"] = err.code
                headers["X-Error-Message"] = err.message
                self._send_json(err.status, {"error": err.message}, headers)
            except Exception as err:  # a bug here must reach the client as a 500, not a dropped connection
                logger.exception("test hub failed on %s %s", self.command, self.path)
                self._send_json(500, {"error": f"{type(err).__name__}: {err}"})

        # ---- verbs ------------------------------------------------------------------------------------------------
        def do_GET(self):  # noqa: N802
            self._dispatch((self._whoami, self._repo_info, self._tree, self._resolve))

        def do_HEAD(self):  # noqa: N802
            self._dispatch((self._resolve,))

        def do_POST(self):  # noqa: N802
            self._dispatch((self._create, self._delete, self._validate_yaml, self._preupload, self._commit_route,
                            self._branch))

        # ---- path parsing -----------------------------------------------------------------------------------------
        @staticmethod
        def _api_repo(segments: list[str], keyword: str | None) -> tuple[str, str, list[str]] | None:
            """`/api/{type}s/{repo}[/{keyword}/...]` -> (type, repo_id, segments after keyword)."""
            if len(segments) < 3 or segments[0] != "api" or segments[1] not in ("models", "datasets", "spaces"):
                return None
            repo_type, rest = segments[1][:-1], [unquote(s) for s in segments[2:]]
            if keyword is None:
                if len(rest) in (1, 2) and "revision" not in rest:
                    return repo_type, "/".join(rest), []
                return None
            for width in (2, 1):  # namespace/name, then a bare name
                if len(rest) > width and rest[width] == keyword:
                    return repo_type, "/".join(rest[:width]), rest[width + 1:]
            return None

        # ---- routes -------------------------------------------------------------------------------------------
        def _whoami(self, segments, query) -> bool:
            if segments != ["api", "whoami-v2"]:
                return False
            self._need_auth()
            self._send_json(200, {"type": "user", "id": "0" * 24, "name": hub.user, "fullname": "Test User",
                                  "email": None, "orgs": [], "isPro": False,
                                  "auth": {"type": "access_token", "accessToken": {"displayName": "test",
                                                                                    "role": "write"}}})
            return True

        def _create(self, segments, query) -> bool:
            if segments != ["api", "repos", "create"]:
                return False
            self._need_auth()
            body = self._json_body()
            private = bool(body.get("private")) or body.get("visibility") == "private"
            repo, created = hub.create_repo(body.get("type") or "model", body.get("organization"),
                                            str(body.get("name") or ""), private)
            prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
            payload = {"url": f"{hub.url}/{prefix}{repo.repo_id}", "name": repo.repo_id, "id": repo.repo_id}
            if created:
                self._send_json(200, payload)
            else:
                self._send_json(409, {**payload, "error": "You already created this repo"},
                                {"X-Error-Message": "You already created this repo"})
            return True

        def _delete(self, segments, query) -> bool:
            if segments != ["api", "repos", "delete"]:
                return False
            self._need_auth()
            body = self._json_body()
            repo_type = body.get("type") or "model"
            repo_id = f"{body.get('organization') or hub.user}/{body.get('name')}"
            with hub.lock:
                if hub.repos.pop((repo_type, repo_id), None) is None:
                    raise HubError(404, "Repository not found", "RepoNotFound")
            self._send_json(200, {})
            return True

        def _validate_yaml(self, segments, query) -> bool:
            if segments != ["api", "validate-yaml"]:
                return False
            content = str(self._json_body().get("content") or "")
            errors = []
            if content.startswith("---"):
                match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
                if match is None:
                    errors.append({"message": "the front matter is not closed by a '---' line"})
                elif _card_data(content.encode()) is None and match.group(1).strip():
                    errors.append({"message": "the front matter is not a YAML mapping"})
            self._send_json(400 if errors else 200, {"errors": errors, "warnings": []})
            return True

        def _repo_info(self, segments, query) -> bool:
            parsed = self._api_repo(segments, None)
            revision = None
            if parsed is None:
                parsed = self._api_repo(segments, "revision")
                if parsed is None or not parsed[2]:
                    return False
                revision = "/".join(parsed[2])
            repo_type, repo_id, _ = parsed
            repo = hub.repo(repo_type, repo_id, self._authorized())
            with hub.lock:
                commit = repo.resolve(revision or DEFAULT_BRANCH)
                card = _card_data(commit.files.get("README.md"))
                blobs = _truthy(query.get("blobs"))
                siblings = []
                for path in sorted(commit.files):
                    entry = {"rfilename": path}
                    if blobs:
                        entry.update(size=len(commit.files[path]), blobId=git_blob_sha1(commit.files[path]))
                    siblings.append(entry)
                config = None
                if "config.json" in commit.files:
                    try:
                        config = json.loads(commit.files["config.json"])
                    except ValueError:
                        config = None
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(commit.created))
            info = {"_id": repo.repo_id, "id": repo.repo_id, "author": repo.repo_id.split("/")[0],
                    "sha": commit.oid, "lastModified": stamp,
                    "createdAt": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(repo.created)),
                    "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                    "tags": list((card or {}).get("tags") or []), "siblings": siblings}
            if repo_type == "model":
                info.update(library_name=(card or {}).get("library_name"),
                            pipeline_tag=(card or {}).get("pipeline_tag"), config=config)
            if card is not None:
                info["cardData"] = card
            self._send_json(200, info)
            return True

        def _tree(self, segments, query) -> bool:
            parsed = self._api_repo(segments, "tree")
            if parsed is None or not parsed[2]:
                return False
            repo_type, repo_id, rest = parsed
            repo = hub.repo(repo_type, repo_id, self._authorized())
            revision, folder = rest[0], "/".join(rest[1:]).strip("/")
            recursive = _truthy(query.get("recursive"))
            with hub.lock:
                commit = repo.resolve(revision)
                files = dict(commit.files)
            prefix = f"{folder}/" if folder else ""
            if folder and folder in files:
                raise HubError(400, f"{folder} is a file, not a folder")
            below = {p: d for p, d in files.items() if p.startswith(prefix)}
            if folder and not below:
                raise HubError(404, f"Folder {folder} not found", "EntryNotFound",
                               {"X-Repo-Commit": commit.oid})
            entries, folders = [], set()
            for path in sorted(below):
                relative = path[len(prefix):].split("/")
                for depth in range(1, len(relative)):  # the folders on the way
                    if recursive or depth == 1:
                        folders.add(prefix + "/".join(relative[:depth]))
                if recursive or len(relative) == 1:
                    data = below[path]
                    entries.append({"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path})
            for path in sorted(folders):
                oid = hashlib.sha1(f"tree:{commit.oid}:{path}".encode()).hexdigest()
                entries.append({"type": "directory", "oid": oid, "size": 0, "path": path})
            entries.sort(key=lambda e: e["path"])
            self._send_json(200, entries)
            return True

        def _preupload(self, segments, query) -> bool:
            parsed = self._api_repo(segments, "preupload")
            if parsed is None or len(parsed[2]) != 1:
                return False
            self._need_auth()
            repo_type, repo_id, (revision,) = parsed
            repo = hub.repo(repo_type, repo_id, True)
            body = self._json_body()
            with hub.lock:
                try:
                    existing = repo.resolve(revision).files
                except HubError:
                    if _truthy(query.get("create_pr")):
                        existing = {}
                    else:
                        raise
            answer = []
            for item in body.get("files") or []:
                path = item.get("path", "")
                if not _valid_path(path):
                    raise HubError(400, f"Invalid path {path!r}")
                data = existing.get(path)
                answer.append({"path": path, "uploadMode": "regular", "shouldIgnore": False,
                               "oid": git_blob_sha1(data) if data is not None else None})
            self._send_json(200, {"files": answer, "commitOid": None})
            return True

        def _commit_route(self, segments, query) -> bool:
            parsed = self._api_repo(segments, "commit")
            if parsed is None or len(parsed[2]) != 1:
                return False
            self._need_auth()
            repo_type, repo_id, (revision,) = parsed
            repo = hub.repo(repo_type, repo_id, True)
            if _truthy(query.get("create_pr")):
                raise HubError(400, "pull requests are not supported by this test server")
            raw = self._body()
            try:
                lines = [json.loads(line) for line in raw.splitlines() if line.strip()]
            except json.JSONDecodeError as err:
                raise HubError(400, f"invalid NDJSON commit payload: {err}") from None
            commit = hub.commit(repo, revision, lines)
            prefix = "" if repo_type == "model" else f"{repo_type}s/"
            self._send_json(200, {"success": True, "commitOid": commit.oid,
                                  "commitUrl": f"{hub.url}/{prefix}{repo.repo_id}/commit/{commit.oid}",
                                  "hookOutput": ""})
            return True

        def _branch(self, segments, query) -> bool:
            parsed = self._api_repo(segments, "branch")
            if parsed is None or not parsed[2]:
                return False
            self._need_auth()
            repo_type, repo_id, rest = parsed
            repo = hub.repo(repo_type, repo_id, True)
            name = "/".join(rest)
            start = self._json_body().get("startingPoint") or DEFAULT_BRANCH
            with hub.lock:
                if name in repo.branches:
                    raise HubError(409, f"Reference already exists: {name}")
                repo.branches[name] = repo.resolve(start).oid
            self._send_json(200, {})
            return True

        def _resolve(self, segments, query) -> bool:
            repo_type = "model"
            if segments and segments[0] in ("datasets", "spaces"):
                repo_type, segments = segments[0][:-1], segments[1:]
            for width in (2, 1):
                if len(segments) > width + 2 and segments[width] == "resolve":
                    repo_id = "/".join(unquote(s) for s in segments[:width])
                    revision, path = unquote(segments[width + 1]), unquote("/".join(segments[width + 2:]))
                    break
            else:
                return False
            repo = hub.repo(repo_type, repo_id, self._authorized())
            with hub.lock:
                commit = repo.resolve(revision)
                data = commit.files.get(path)
            if data is None:
                raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
            headers = {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
            status, body = 200, data
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
            if match and self.command == "GET":
                start = int(match.group(1))
                end = int(match.group(2)) if match.group(2) else len(data) - 1
                if start >= len(data) and len(data) > 0:
                    raise HubError(416, "Requested range not satisfiable", None,
                                   {"Content-Range": f"bytes */{len(data)}"})
                end = min(end, len(data) - 1)
                status, body = 206, data[start:end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(status, body, headers, content_type="application/octet-stream")
            return True

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    hub = HubServer(args.host, args.port).start()
    logger.info("serving the test hub at %s (Ctrl-C stops it)", hub.url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()


if __name__ == "__main__":
    main()
