"""A loopback server speaking the part of the Hub's HTTP protocol that pushing and loading use: repository
creation, preupload, commit (files inline, "regular" upload mode), repository info / tree, and file resolve.
The real `huggingface_hub` client talks to it through `HF_ENDPOINT`; it stands in for the network only.

`fail` makes an endpoint answer with an error status (e.g. `{"commit": 500}`); `token` makes every write
require `Authorization: Bearer <token>` (401 otherwise).
"""

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    def __init__(self, token: str | None = None):
        self.repos: dict[str, dict] = {}
        self.fail: dict[str, int] = {}
        self.token = token
        self.requests: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str) -> dict[str, bytes]:
        return self.repos[repo_id]["files"]

    def _handler(hub):
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, status, body=b"", headers=None, head=False):
                if isinstance(body, (dict, list)):
                    body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **(headers or {})}
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _error(self, status, code, head=False):
                self._send(status, {"error": code}, {"X-Error-Code": code, "X-Error-Message": code}, head)

            def _body(self):
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _authorized(self):
                return hub.token is None or self.headers.get("Authorization") == f"Bearer {hub.token}"

            def do_POST(self):
                hub.requests.append(f"POST {self.path}")
                body = self._body()
                path = self.path.split("?")[0]
                if path == "/api/validate-yaml":  # the client checks model-card metadata before uploading it
                    return self._send(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    if not self._authorized():
                        return self._error(401, "Unauthorized")
                    data = json.loads(body)
                    repo_id = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                    hub.repos.setdefault(repo_id, {"files": {}, "sha": "0" * 40, "private": bool(data.get("private"))})
                    return self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id, "id": repo_id})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
                if not match:
                    return self._error(404, "EndpointNotFound")
                repo_id, action, _ = match.groups()
                if action in hub.fail:
                    return self._error(hub.fail[action], "InjectedFailure")
                if not self._authorized():
                    return self._error(401, "Unauthorized")
                if repo_id not in hub.repos:
                    return self._error(404, "RepoNotFound")
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files
                    ]})  # fmt: skip
                repo = hub.repos[repo_id]
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        repo["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "deletedFile":
                        repo["files"].pop(item["value"]["path"], None)
                repo["sha"] = hashlib.sha1(json.dumps(sorted(repo["files"])).encode() + body).hexdigest()
                return self._send(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{repo['sha']}",
                                        "commitOid": repo["sha"], "pullRequestUrl": None})  # fmt: skip

            def do_HEAD(self):
                self.do_GET(head=True)

            def do_GET(self, head=False):
                hub.requests.append(f"{'HEAD' if head else 'GET'} {self.path}")
                path = self.path.split("?")[0]
                match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if match:
                    repo_id, _, filename = match.groups()
                    if repo_id not in hub.repos:
                        return self._error(404, "RepoNotFound", head)
                    repo = hub.repos[repo_id]
                    if filename not in repo["files"]:
                        return self._error(404, "EntryNotFound", head)
                    content = repo["files"][filename]
                    etag = f'"{hashlib.sha256(content).hexdigest()}"'
                    return self._send(200, content, {"ETag": etag, "X-Repo-Commit": repo["sha"]}, head)
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
                if match and match.group(1) in hub.repos:
                    repo_id = match.group(1)
                    repo = hub.repos[repo_id]
                    siblings = [{"rfilename": name} for name in sorted(repo["files"])]
                    info = {"id": repo_id, "modelId": repo_id, "sha": repo["sha"], "private": repo["private"]}
                    return self._send(200, {**info, "siblings": siblings}, head=head)
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+/?(.*)", path)
                if match and match.group(1) in hub.repos:
                    repo_id, folder = match.groups()
                    entries = [
                        {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        for name, data in sorted(hub.files(repo_id).items())
                        if name.startswith(folder)
                    ]
                    return self._send(200, entries, head=head) if entries else self._error(404, "EntryNotFound", head)
                return self._error(404, "RepoNotFound", head)

        return Handler


__all__ = ["FakeHub"]
