"""Local stand-ins for the Hugging Face Hub and ModelScope APIs, for `quantkit push` tests.

The real `huggingface_hub` and `modelscope_hub` clients talk to these servers over HTTP on
127.0.0.1, so a test exercises the same requests a real push sends: token check, repo
creation, README validation, pre-upload negotiation, blob upload and the commit. Files that
arrive are stored per repo and branch so tests can compare them byte for byte.

Only the requests those clients make for create-repo + upload-folder are implemented. The
HF server answers the pre-upload call with "regular" (base64 inside the commit) or "lfs" for
each file. An "lfs" file then travels the way the installed client chooses: through Xet
storage when `hf_xet` is installed (the default: xet token route, xorb and shard uploads to
a small CAS under /cas, from which the server rebuilds each file and checks its sha256), or
through the git-LFS batch API and a PUT when xet is disabled
(`huggingface_hub.constants.HF_HUB_DISABLE_XET`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})
    commits: list[dict] = field(default_factory=list)


@dataclass
class HubState:
    """What a server has seen and stored; tests read it after the push."""

    tokens: dict[str, str]  # token -> role ("write" or "read")
    default_branch: str = "main"
    lfs_suffixes: tuple[str, ...] = ()  # paths the HF server asks to upload through LFS
    stall: tuple[str, ...] = ()  # route names that never answer (a hung hub)
    redirect_to: str | None = None  # answer every request with a redirect there
    repos: dict[str, Repo] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content (LFS store)
    xorbs: dict[str, list[bytes]] = field(default_factory=dict)  # xet hash -> its chunks
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    lock: threading.Lock = field(default_factory=threading.Lock)
    released: threading.Event = field(default_factory=threading.Event)

    def files(self, repo_id: str, branch: str | None = None) -> dict[str, bytes]:
        return self.repos[repo_id].branches[branch or self.default_branch]

    def upload_requests(self) -> list[tuple[str, str]]:
        """Requests that create something: repos, blobs, commits (not probes)."""
        return [(m, p) for m, p in self.requests
                if m in ("PUT", "POST") and not p.endswith(("/validate-yaml", "/login"))]


class _Handler(BaseHTTPRequestHandler):
    state: HubState
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        pass

    # ------------------------------------------------------------------ plumbing

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            return self.rfile.read(length)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return b""

    def _send(self, status: int, obj=None, headers: dict | None = None) -> None:
        data = b"" if obj is None else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[len("Bearer "):]
        cookie = self.headers.get("Cookie", "")
        m = re.search(r"m_session_id=([^;]+)", cookie)
        return m.group(1) if m else None

    def _role(self) -> str | None:
        return self.state.tokens.get(self._token() or "")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        with self.state.lock:
            self.state.requests.append((method, path))
        body = self._body() if method in ("POST", "PUT") else b""
        if self.state.redirect_to:
            self._send(301, {}, {"Location": self.state.redirect_to + url.path})
            return
        for pattern, allowed, handler in self.routes:
            m = re.fullmatch(pattern, path)
            if m and method == allowed:
                if handler.__name__ in self.state.stall:
                    # Hang until the test ends, then fail for good so the abandoned
                    # client thread stops instead of retrying.
                    self.state.released.wait()
                    self._send(400, {"error": "stalled", "Message": "stalled"})
                    return
                handler(self, body, parse_qs(url.query), **m.groupdict())
                return
        self._send(404, {"error": f"no route {method} {path}"})

    def do_GET(self):  # noqa: N802
        self._dispatch("GET")

    def do_POST(self):  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self):  # noqa: N802
        self._dispatch("PUT")

    routes: list = []


# ---------------------------------------------------------------------- Xet formats


def _xet_hex(raw: bytes) -> str:
    """Xet prints a 32-byte hash as four little-endian u64 words, each in big-endian hex."""
    return "".join(raw[i:i + 8][::-1].hex() for i in range(0, 32, 8))


def _xorb_chunks(data: bytes) -> list[bytes]:
    """A xorb's chunks, uncompressed. Header: version, size (u24), scheme, raw size (u24)."""
    chunks, pos = [], 0
    while pos + 8 <= len(data) and data[pos] == 0:
        size = int.from_bytes(data[pos + 1:pos + 4], "little")
        scheme = data[pos + 4]
        raw_size = int.from_bytes(data[pos + 5:pos + 8], "little")
        payload = data[pos + 8:pos + 8 + size]
        pos += 8 + size
        if scheme == 0:
            chunk = payload
        elif scheme == 1:
            chunk = _lz4_frame(payload)
        elif scheme == 2:  # byte grouping: byte k of every 4-byte word stored together
            chunk = _ungroup4(_lz4_frame(payload))
        else:
            raise ValueError(f"unknown xet compression scheme {scheme}")
        if len(chunk) != raw_size:
            raise ValueError("xet chunk has the wrong size after decompression")
        chunks.append(chunk)
    return chunks


def _shard_files(data: bytes) -> list[tuple[str, list[tuple[str, int, int]]]]:
    """(sha256, [(xorb, first chunk, end chunk)]) per file in a shard's file-info section."""
    bookend = b"\xff" * 32
    files, pos = [], 48  # header: 32-byte tag, u64 version, u64 footer size
    while data[pos:pos + 32] != bookend:
        flags, count = struct.unpack_from("<II", data, pos + 32)
        pos += 48
        ranges = []
        for _ in range(count):
            _, _, start, end = struct.unpack_from("<IIII", data, pos + 32)
            ranges.append((_xet_hex(data[pos:pos + 32]), start, end))
            pos += 48
        if flags & 0x80000000:  # one verification entry per range
            pos += 48 * count
        if flags & 0x40000000:  # metadata extension: the file's sha256
            files.append((_xet_hex(data[pos:pos + 32]), ranges))
            pos += 48
    return files


def _ungroup4(data: bytes) -> bytes:
    out = bytearray(len(data))
    pos = 0
    for k in range(4):
        n = len(range(k, len(data), 4))
        out[k::4] = data[pos:pos + n]
        pos += n
    return bytes(out)


def _lz4_frame(data: bytes) -> bytes:
    """Decode an LZ4 frame (the stdlib has no LZ4; these are small test files)."""
    if data[:4] != b"\x04\x22\x4d\x18":
        raise ValueError("not an LZ4 frame")
    flags = data[4]
    pos = 7 + (8 if flags & 0x08 else 0) + (4 if flags & 0x01 else 0)
    out = bytearray()
    while True:
        size = int.from_bytes(data[pos:pos + 4], "little")
        pos += 4
        if size == 0:
            return bytes(out)
        block = data[pos:pos + (size & 0x7FFFFFFF)]
        pos += (size & 0x7FFFFFFF) + (4 if flags & 0x10 else 0)
        if size & 0x80000000:
            out += block
        else:
            _lz4_block(block, out)


def _lz4_block(src: bytes, out: bytearray) -> None:
    i = 0
    while i < len(src):
        token = src[i]
        i += 1
        literals = token >> 4
        if literals == 15:
            while src[i] == 255:
                literals += 255
                i += 1
            literals += src[i]
            i += 1
        out += src[i:i + literals]
        i += literals
        if i >= len(src):
            return
        offset = src[i] | src[i + 1] << 8
        i += 2
        length = token & 15
        if length == 15:
            while src[i] == 255:
                length += 255
                i += 1
            length += src[i]
            i += 1
        length += 4
        start = len(out) - offset
        if offset >= length:
            out += out[start:start + length]
        else:  # overlapping copy repeats the last `offset` bytes
            for k in range(length):
                out.append(out[start + k])


def _git_sha1(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


# ---------------------------------------------------------------------- Hugging Face


class HfHandler(_Handler):
    """The Hub routes `create_repo`, `create_branch` and `upload_folder` use."""

    def _auth(self, write: bool = False) -> bool:
        role = self._role()
        if role is None:
            self._send(401, {"error": "Invalid credentials in Authorization header"},
                       {"X-Error-Code": "InvalidCredentials"})
            return False
        if write and role != "write":
            self._send(403, {"error": "You don't have the rights to write to this repo"})
            return False
        return True

    def _repo(self, repo_id: str) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        return repo

    def _branch(self, repo: Repo, revision: str) -> dict | None:
        files = repo.branches.get(revision)
        if files is None:
            self._send(404, {"error": f"Invalid rev id: {revision}"},
                       {"X-Error-Code": "RevisionNotFound"})
        return files

    def whoami(self, body, query):
        if self._auth():
            self._send(200, {"type": "user", "name": "tester",
                             "auth": {"type": "access_token",
                                      "accessToken": {"role": self._role()}}})

    def create_repo(self, body, query):
        if not self._auth(write=True):
            return
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or 'tester'}/{payload['name']}"
        url = f"http://{self.headers['Host']}/{repo_id}"
        with self.state.lock:
            if repo_id in self.state.repos:
                self._send(409, {"error": "You already created this model repo", "url": url})
                return
            self.state.repos[repo_id] = Repo(private=payload.get("visibility") == "private")
        self._send(200, {"url": url, "name": repo_id})

    def repo_info(self, body, query, repo_id, revision=None):
        if not self._auth():
            return
        repo = self._repo(repo_id)
        if repo is None or (files := self._branch(repo, revision or "main")) is None:
            return
        self._send(200, {"id": repo_id, "private": repo.private, "sha": "0" * 40,
                         "siblings": [{"rfilename": name} for name in sorted(files)]})

    def create_branch(self, body, query, repo_id, branch):
        if not self._auth(write=True) or (repo := self._repo(repo_id)) is None:
            return
        if branch in repo.branches:
            self._send(409, {"error": "Reference already exists"})
            return
        start = json.loads(body or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = dict(repo.branches[start])
        self._send(200, {})

    def validate_yaml(self, body, query):
        content = json.loads(body)["content"]
        m = re.match(r"^---\n(.*?)\n---\n", content, flags=re.S)
        try:
            meta = yaml.safe_load(m.group(1)) if m else {}
        except yaml.YAMLError as exc:
            self._send(400, {"errors": [{"message": f"invalid YAML: {exc}"}]})
            return
        if not isinstance(meta, dict):
            self._send(400, {"errors": [{"message": "metadata must be a mapping"}]})
            return
        self._send(200, {"errors": [], "warnings": []})

    def preupload(self, body, query, repo_id, revision):
        if not self._auth(write=True) or (repo := self._repo(repo_id)) is None:
            return
        if self._branch(repo, revision) is None:
            return
        files = json.loads(body)["files"]
        self._send(200, {"files": [
            {"path": f["path"], "shouldIgnore": False, "oid": None,
             "uploadMode": "lfs" if f["path"].endswith(self.state.lfs_suffixes) else "regular"}
            for f in files]})

    def xet_token(self, body, query, repo_id, revision):
        if not self._auth(write=True) or self._repo(repo_id) is None:
            return
        self._send(200, {"accessToken": "xet-" + uuid.uuid4().hex, "exp": int(time.time()) + 3600,
                         "casUrl": f"http://{self.headers['Host']}/cas"})

    # Xet CAS. The client asks whether chunks exist (404: no), may ask for an upload grant
    # (404: upload directly), POSTs each xorb (its chunks, each with an 8-byte header), then
    # a shard that maps every file to chunk ranges of xorbs plus the file's sha256. v2 of
    # the shard route streams progress frames; answering 404 makes the client use v1.

    def cas_missing(self, body, query, **_):
        self._send(404, {"error": "not found"})

    def cas_xorb(self, body, query, xorb):
        with self.state.lock:
            self.state.xorbs[xorb] = _xorb_chunks(body)
        self._send(200, {"was_inserted": True})

    def cas_shard(self, body, query):
        for sha256, ranges in _shard_files(body):
            try:
                content = b"".join(b"".join(self.state.xorbs[x][start:end])
                                   for x, start, end in ranges)
            except KeyError:
                self._send(400, {"error": "shard names a xorb that was never uploaded"})
                return
            if hashlib.sha256(content).hexdigest() != sha256:
                self._send(400, {"error": f"file {sha256} does not rebuild from its chunks"})
                return
            with self.state.lock:
                self.state.blobs[sha256] = content
        self._send(200, {"result": 1})

    def lfs_batch(self, body, query, repo_id):
        if not self._auth(write=True) or self._repo(repo_id) is None:
            return
        payload = json.loads(body)
        host = f"http://{self.headers['Host']}"
        objects = []
        for obj in payload["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.state.blobs:
                entry["actions"] = {"upload": {"href": f"{host}/lfs-storage/{obj['oid']}"},
                                    "verify": {"href": f"{host}/lfs-verify"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, body, query, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            self._send(400, {"error": "sha256 mismatch"})
            return
        with self.state.lock:
            self.state.blobs[oid] = body
        self._send(200)

    def lfs_verify(self, body, query):
        payload = json.loads(body)
        ok = len(self.state.blobs.get(payload["oid"], b"")) == payload["size"]
        self._send(200 if ok else 404, {})

    def commit(self, body, query, repo_id, revision):
        if not self._auth(write=True) or (repo := self._repo(repo_id)) is None:
            return
        if (files := self._branch(repo, revision)) is None:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        staged = dict(files)
        header = {}
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                staged[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                blob = self.state.blobs.get(value["oid"])
                if blob is None:
                    self._send(422, {"error": f"LFS object {value['oid']} was never uploaded"})
                    return
                staged[value["path"]] = blob
            elif key == "deletedFile":
                staged.pop(value["path"], None)
        oid = hashlib.sha1(json.dumps(sorted((k, _git_sha1(v)) for k, v in staged.items()))
                           .encode()).hexdigest()
        with self.state.lock:
            repo.branches[revision] = staged
            repo.commits.append({"revision": revision, "oid": oid, **header})
        self._send(200, {"commitUrl": f"http://{self.headers['Host']}/{repo_id}/commit/{oid}",
                         "commitOid": oid, "pullRequestUrl": None})

    _REPO = r"(?P<repo_id>[^/]+/[^/]+)"
    routes = [
        (r"/api/whoami-v2", "GET", whoami),
        (r"/api/repos/create", "POST", create_repo),
        (r"/api/validate-yaml", "POST", validate_yaml),
        (rf"/api/models/{_REPO}", "GET", repo_info),
        (rf"/api/models/{_REPO}/revision/(?P<revision>.+)", "GET", repo_info),
        (rf"/api/models/{_REPO}/branch/(?P<branch>.+)", "POST", create_branch),
        (rf"/api/models/{_REPO}/preupload/(?P<revision>.+)", "POST", preupload),
        (rf"/api/models/{_REPO}/xet-write-token/(?P<revision>.+)", "GET", xet_token),
        (r"/cas/v1/chunks/.*", "GET", cas_missing),
        (r"/cas/v1/xorb-grants/.*", "POST", cas_missing),
        (r"/cas/v1/xorbs/default/(?P<xorb>[0-9a-f]{64})", "POST", cas_xorb),
        (r"/cas/v2/shards", "POST", cas_missing),
        (r"/cas/v1/shards", "POST", cas_shard),
        (rf"/api/models/{_REPO}/commit/(?P<revision>.+)", "POST", commit),
        (rf"/{_REPO}\.git/info/lfs/objects/batch", "POST", lfs_batch),
        (r"/lfs-storage/(?P<oid>[0-9a-f]{64})", "PUT", lfs_put),
        (r"/lfs-verify", "POST", lfs_verify),
    ]


# ---------------------------------------------------------------------- ModelScope


class ModelScopeHandler(_Handler):
    """The routes `modelscope_hub.HubApi.create_repo` and `upload_folder` use.

    ModelScope's legacy API wraps answers in {"Code", "Data", "Success"}; its commit takes
    JSON actions, "normal" files inline in base64 and "lfs" files by sha256 after a git-LFS
    style batch call and a PUT of the blob.
    """

    def _auth(self, write: bool = False) -> bool:
        role = self._role()
        if role is None:
            self._send(401, {"Code": 401, "Message": "invalid access token", "Success": False})
            return False
        if write and role != "write":
            self._send(403, {"Code": 403, "Message": "permission denied", "Success": False})
            return False
        return True

    def _ok(self, data) -> None:
        self._send(200, {"Code": 200, "Data": data, "Success": True})

    def whoami(self, body, query):
        if self._auth():
            self._send(200, {"success": True, "data": {"username": "tester"}})

    def create_repo(self, body, query):
        if not self._auth(write=True):
            return
        payload = json.loads(body)
        repo_id = f"{payload['Path']}/{payload['Name']}"
        with self.state.lock:
            if repo_id in self.state.repos:
                self._send(409, {"Message": "model already exists", "Success": False})
                return
            repo = Repo(private=payload.get("Visibility") == 1)
            repo.branches = {self.state.default_branch: {}}
            repo.commits.append({"license": payload.get("License")})
            self.state.repos[repo_id] = repo
        self._ok({"Path": payload["Path"], "Name": payload["Name"]})

    def lfs_batch(self, body, query, repo_id):
        if not self._auth(write=True):
            return
        if repo_id not in self.state.repos:
            self._send(404, {"Code": 404, "Message": "repo not found", "Success": False})
            return
        host = f"http://{self.headers['Host']}"
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"], "actions": {}}
            if obj["oid"] not in self.state.blobs:
                entry["actions"] = {"upload": {"href": f"{host}/ms-lfs/{obj['oid']}"}}
            objects.append(entry)
        self._ok({"objects": objects})

    def lfs_put(self, body, query, oid):
        if not self._auth(write=True):
            return
        if hashlib.sha256(body).hexdigest() != oid:
            self._send(400, {"Code": 400, "Message": "sha256 mismatch", "Success": False})
            return
        with self.state.lock:
            self.state.blobs[oid] = body
        self._send(200, {"Code": 200})

    def commit(self, body, query, repo_id, revision):
        if not self._auth(write=True):
            return
        repo = self.state.repos.get(repo_id)
        if repo is None:
            self._send(404, {"Code": 404, "Message": "repo not found", "Success": False})
            return
        payload = json.loads(body)
        staged = dict(repo.branches.get(revision, {}))
        for action in payload["actions"]:
            if action["action"] == "delete":
                staged.pop(action["path"], None)
            elif action["type"] == "lfs":
                blob = self.state.blobs.get(action["sha256"])
                if blob is None:
                    self._send(400, {"Code": 400, "Message": "blob missing", "Success": False})
                    return
                staged[action["path"]] = blob
            else:
                staged[action["path"]] = base64.b64decode(action["content"])
        with self.state.lock:
            repo.branches[revision] = staged
            repo.commits.append({"revision": revision, "summary": payload["commit_message"]})
        self._ok({"CommitId": uuid.uuid4().hex})

    _REPO = r"(?P<repo_id>[^/]+/[^/]+)"
    routes = [
        (r"/openapi/v1/users/me", "GET", whoami),
        (r"/api/v1/models", "POST", create_repo),
        (rf"/api/v1/repos/models/{_REPO}/info/lfs/objects/batch", "POST", lfs_batch),
        (r"/ms-lfs/(?P<oid>[0-9a-f]{64})", "PUT", lfs_put),
        (rf"/api/v1/repos/models/{_REPO}/commit/(?P<revision>.+)", "POST", commit),
    ]


# ---------------------------------------------------------------------- server


class HubServer:
    """`with HubServer("hf", tokens={...}) as hub:` serves on 127.0.0.1 at `hub.url`."""

    handlers = {"hf": HfHandler, "modelscope": ModelScopeHandler}

    def __init__(self, kind: str, *, tokens: dict[str, str], **state_options):
        self.state = HubState(tokens=tokens, **state_options)
        handler = type(f"Bound{kind}", (self.handlers[kind],), {"state": self.state})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.state.released.set()
        self._httpd.shutdown()
        self._httpd.server_close()


def new_token(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
