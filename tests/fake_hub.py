"""A Hugging Face Hub stand-in on 127.0.0.1 for tests: the two requests ``hf_hub_download`` makes.

``HEAD`` and ``GET`` on ``/{org}/{repo}/resolve/{revision}/{filename}`` answer with the headers
huggingface_hub reads (``huggingface_hub.file_download.get_hf_file_metadata``): ``X-Repo-Commit``
(the commit the revision resolves to), ``ETag`` (the file's SHA-256, as the Hub gives for LFS
files), ``Content-Length``; an unknown file is a 404 with ``X-Error-Code: EntryNotFound``. Point
``hf_hub_download(endpoint=hub.url)`` or ``HF_ENDPOINT`` at it.

Example:
    >>> with FakeHub({("org/repo", "a" * 40, "w.pth"): b"bytes"}) as hub:
    ...     hf_hub_download("org/repo", "w.pth", revision="a" * 40, endpoint=hub.url, cache_dir=tmp)
"""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeHub:
    """Serves ``files``: {(repo_id, revision, filename): bytes}; ``requests`` records (method, path)."""

    def __init__(self, files: dict[tuple[str, str, str], bytes]) -> None:
        self.files = dict(files)
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:  # noqa: N802 (http.server's naming)
                self._answer(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                hub.requests.append((self.command, self.path))
                org, repo, verb, revision, filename = (self.path.split("?")[0].lstrip("/").split("/", 4) + [""] * 5)[:5]
                data = hub.files.get((f"{org}/{repo}", revision, filename)) if verb == "resolve" else None
                if data is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", revision)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", revision)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Content-Type", "application/octet-stream")
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
