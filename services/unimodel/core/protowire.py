"""The protobuf base-128 varint, for the encodings assembled by hand where the generated code would cost
more per message: the OTLP span encoder (core/otlp.py) and numeric lists as google.protobuf.Value
(core/value_arrays.py). Messages built from already-encoded parts use the generated code and
`repeated bytes` mirrors instead (EncodedItemBundle, EncodedBatchRequest in inference.proto).
"""

from __future__ import annotations

_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def varint(n: int) -> bytes:
    """Base-128 varint of a non-negative int (the fast paths cover lengths and small values)."""
    if n < 0x80:
        return _ONE_BYTE[n]
    if n < 0x4000:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
