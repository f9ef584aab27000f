"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the `traceparent` corral forwards.

corral records no spans of its own; it is a pass-through participant:

* a valid `traceparent` from a trusted proxy is forwarded unchanged (and its `tracestate` with it);
* anything else, no header, an invalid one, or one from a client that is not a trusted proxy, gets a
  new trace ("restart trace" in W3C's words, what a front gate into a network does): a random trace id
  and span id, and the sampled flag set for `trace_sample` of them. The old `tracestate` is dropped.

The trace id is what corral logs (`trace_id`) and what it uses as the request id it makes up. This runs
once per request: one draw from a PRNG seeded from the OS (no syscall per request, unlike os.urandom:
trace ids need to be unique and unguessable enough to not collide, not to be secret) and a hexlify.
"""

from __future__ import annotations

import binascii
import random
import re

# version "-" trace-id "-" parent-id "-" flags, lower-case hex; a later version may add "-..." fields.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^\x00-\x1f\x7f]*)?\Z")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
MAX_TRACEPARENT = 512  # future versions may be longer than 55 bytes, but not unboundedly
_SAMPLED, _NOT_SAMPLED = b"03", b"02"  # bit 1: random trace id (level 2); bit 0: sampled

_draw = random.Random().getrandbits  # its own generator, seeded from os.urandom when created
_sample_below = 1 << 32  # a started trace is sampled when a random 32-bit draw is below this


def configure(sample: float) -> None:
    """The share of started traces marked sampled, 0.0 to 1.0 (the `trace_sample` knob)."""
    global _sample_below
    _sample_below = round(min(max(sample, 0.0), 1.0) * (1 << 32))


def accept(value: bytes | None) -> bytes | None:
    """`value` when it is a traceparent corral may continue, else None (the trace restarts)."""
    if value is None or not 55 <= len(value) <= MAX_TRACEPARENT:
        return None
    m = _TRACEPARENT.match(value)
    if m is None:
        return None
    version, trace, span, _flags, rest = m.groups()
    if version == b"ff" or (version == b"00" and rest is not None):  # 00 is exactly 55 bytes
        return None
    if trace == _ZERO_TRACE or span == _ZERO_SPAN:
        return None
    return value


def start() -> bytes:
    """A new traceparent: version 00, random trace id and span id, the sampled flag by `trace_sample`."""
    raw = _draw(224).to_bytes(28, "big")  # 16 trace id + 8 span id + 4 for the sampling draw
    ids = binascii.hexlify(raw[:24])
    if ids[:32] == _ZERO_TRACE or ids[32:] == _ZERO_SPAN:  # 2**-64 at worst; all zeros is invalid
        return start()
    flags = _SAMPLED if int.from_bytes(raw[24:], "big") < _sample_below else _NOT_SAMPLED
    return b"00-%s-%s-%s" % (ids[:32], ids[32:], flags)


def trace_id(traceparent: bytes) -> bytes:
    """The 32 hex digits of the trace id (at the same place in every version)."""
    return traceparent[3:35]
