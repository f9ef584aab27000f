"""Bodies corral holds on its own side, so that neither end of an exchange waits for the other.

* RequestBody: a request body read whole before its request goes out (nginx's proxy_request_buffering):
  memory up to a limit, then a temporary file. A slow uploader costs corral a file, never a worker; and the
  body can be sent twice, should the first connection turn out to be one the worker had closed, or the worker
  be killed from outside (pool.redispatch). It is held until the first byte of the response goes to the
  client, or the exchange ends: no longer, since nothing can be sent again after that.
* Spill: response bytes the client has not taken yet, beyond its transport buffer (proxy_buffering): a
  temporary file, so the worker is freed before a slow reader has read its answer. When the file cannot
  grow (a full disk), the bytes stay in memory and the caller stops reading the worker: back-pressure,
  never a lost byte.

Both files are unbuffered and anonymous (tempfile.TemporaryFile): nothing is left behind, whatever ends.
"""

from __future__ import annotations

import os
import tempfile
from collections import deque
from typing import IO

READ_SIZE = 256 * 1024  # bytes read back from a file per write to a socket


def _temp_file(prefix: str) -> IO[bytes]:
    return tempfile.TemporaryFile(prefix=prefix, buffering=0)  # closed by its owner


class RequestBody:
    """A whole request body: the first `memory` bytes in memory, the rest in a temporary file."""

    __slots__ = ("_joined", "chunks", "closed", "file", "in_memory", "memory", "size")

    def __init__(self, memory: int) -> None:
        self.memory = memory
        self.chunks: list[bytes] = []
        self.in_memory = 0
        self.file: IO[bytes] | None = None
        self.size = 0
        self._joined: bytes | None = None
        self.closed = False  # its bytes are gone: it cannot be sent again

    def add(self, data: bytes) -> None:
        """Raises OSError when the file cannot take the bytes (the request cannot be buffered)."""
        if self.file is None and self.in_memory + len(data) <= self.memory:
            self.chunks.append(data)
            self.in_memory += len(data)
        else:
            if self.file is None:
                self.file = _temp_file("corral-request-")
            _, err = _write_some(self.file, data)
            if err is not None:
                raise err
        self.size += len(data)

    def read(self, pos: int, n: int = READ_SIZE) -> bytes:
        """Up to n bytes from offset pos (memory first, then the file)."""
        if pos < self.in_memory:
            if self._joined is None:
                self._joined = b"".join(self.chunks)
                self.chunks = [self._joined]
            return self._joined[pos : pos + n]
        if self.file is None:
            return b""
        return os.pread(self.file.fileno(), n, pos - self.in_memory)

    def close(self) -> None:
        self.closed = True
        self.chunks = []
        self._joined = None
        if self.file is not None:
            self.file.close()
            self.file = None


class Spill:
    """Response bytes the client has not taken yet, past its transport buffer, in arrival order."""

    __slots__ = ("file", "held", "read_at", "size", "stuck", "written")

    def __init__(self) -> None:
        self.file: IO[bytes] | None = None
        self.written = 0  # bytes in the file
        self.read_at = 0  # file bytes already given back
        self.held: deque[bytes] = deque()  # bytes the file could not take, after all of the file's
        self.size = 0  # bytes not yet given back, file and memory
        self.stuck: OSError | None = None  # why the file stopped growing

    def push(self, data: bytes) -> bool:
        """Keep `data`; False when it had to stay in memory (the caller must stop reading the worker)."""
        self.size += len(data)
        if self.stuck is None and not self.held:
            try:
                if self.file is None:
                    self.file = _temp_file("corral-response-")
                done, self.stuck = _write_some(self.file, data)
            except OSError as exc:  # not even an empty file could be made
                done, self.stuck = 0, exc
            self.written += done
            if done == len(data):
                return True
            data = data[done:]
        self.held.append(data)
        return False

    def pop(self, n: int = READ_SIZE) -> bytes:
        if self.read_at < self.written:
            assert self.file is not None
            data = os.pread(self.file.fileno(), min(n, self.written - self.read_at), self.read_at)
            self.read_at += len(data)
        elif self.held:
            data = self.held.popleft()
        else:
            return b""
        self.size -= len(data)
        return data

    def close(self) -> None:
        self.held.clear()
        if self.file is not None:
            self.file.close()


def _write_some(f: IO[bytes], data: bytes) -> tuple[int, OSError | None]:
    """Write what the file takes: (bytes written, the error that stopped it, if any). A full disk often
    takes part of a write first and refuses the next, so the part written must still be counted."""
    done = 0
    view = memoryview(data)
    while done < len(data):
        try:
            n = f.write(view[done:])
        except OSError as exc:
            return done, exc
        if not n:
            return done, OSError(28, os.strerror(28))
        done += n
    return done, None
