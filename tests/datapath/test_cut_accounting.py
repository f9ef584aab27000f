"""Red team: a response cut by its worker logged more body bytes than the client could ever get (fixed: the
exchange keeps an edge.ChunkLedger of a re-chunked body's chunks on the wire).

Found by tests/datapath/test_exchange_machine.py's own `logged-more-than-taken` invariant with
CORRAL_MACHINE_RANDOM=1 (the derandomized default run does not reach it). Not from the last commits: the same
numbers come out on 93284ab.

A client that stops reading makes the exchange spill the worker's next body bytes to a file; the worker then
dies. `_cut` -> `end()` throws the spill away (those bytes never reach the client), but `_took()` counted a
worker cut as `client.written - wire_start - head_len` capped by `body_out`: `client.written` includes the
chunk framing of the bytes that did go out, and `body_out` includes the spilled bytes that did not.
"""

from __future__ import annotations

import pytest
from support.exchange_rig import Conn, Rig, get

pytestmark = pytest.mark.unit


def test_a_worker_cut_never_logs_spilled_bytes_the_client_never_got():
    rig = Rig(response_buffer=16)
    c = Conn(rig)
    c.transport.kernel = 0  # the client reads nothing for now: every byte waits in the transport's buffer
    c.send(get("/r"))
    up = c.upstream()
    up.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nr\r\n")
    assert c.conn.write_blocked  # the client's buffer is over response_buffer
    up.data_received(b"1\r\ns\r\n")  # ... so this byte goes to the spill file
    assert c.conn.current.spill is not None
    up.transport.lose()  # the worker dies mid-body
    [logged] = rig.observed
    assert logged.status == 502 and logged.cut == "worker failed"
    sent = c.transport.take()  # everything corral handed to the client's socket
    body = sent.split(b"\r\n\r\n", 1)[1]
    assert body == b"1\r\nr\r\n"  # one body byte, re-chunked; the spilled 's' was dropped
    assert logged.bytes_out <= 1, f"logged {logged.bytes_out} body bytes; the client can have had 1 at most"


def test_the_ledger_counts_body_bytes_not_framing_and_forgets_what_was_taken():
    from corral.edge import ChunkLedger, chunk

    ledger = ChunkLedger()
    wire = b""
    for part in (b"r", b"x" * 41, b"yz"):
        ledger.add(len(part))
        wire += chunk(part)
    # every prefix of the framed body holds exactly the body bytes a chunk decoder would have read from it
    for n in range(len(wire) + 1):
        decoded, rest = b"", wire[:n]
        while b"\r\n" in rest:
            size_line, rest = rest.split(b"\r\n", 1)
            size = int(size_line, 16)
            decoded += rest[:size]
            rest = rest[size + 2 :]
        assert ledger.body_within(n) == len(decoded), n
    ledger.taken(len(chunk(b"r")) + 3)  # the first chunk was taken whole, the second in part
    assert len(ledger.marks) == 2
    assert ledger.body_within(len(wire)) == 44
