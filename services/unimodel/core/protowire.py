"""Protobuf wire-format helpers for messages assembled from already-encoded parts (no re-encoding).

Protobuf messages concatenate: a repeated message field is each element's bytes behind a tag and a
length. The gateway bundles encoded BatchItems this way (ItemBundle) and the batcher splits a bundle back
into the items' bytes, which it keeps as they are. The unit tests check the results against the
generated code.
"""

from __future__ import annotations

from collections.abc import Iterable

_BUNDLE_ITEM = b"\x0a"  # ItemBundle.items = 1 (length-delimited)

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


def bundle(items: Iterable[bytes]) -> bytes:
    """An encoded ItemBundle of the given encoded BatchItems (field 1, repeated)."""
    parts = []
    for item in items:
        parts.append(_BUNDLE_ITEM)
        parts.append(varint(len(item)))
        parts.append(item)
    return b"".join(parts)


def bundle_items(data: bytes) -> list[bytes]:
    """The encoded BatchItems of an encoded ItemBundle, without decoding them; ValueError when the bytes
    are not an ItemBundle of that shape."""
    items: list[bytes] = []
    pos, end = 0, len(data)
    while pos < end:
        if data[pos] != 0x0A:  # field 1, length-delimited
            raise ValueError(f"unexpected tag {data[pos]:#x} at byte {pos}")
        pos += 1
        length = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise ValueError("truncated length")
            b = data[pos]
            pos += 1
            length |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
        if pos + length > end:
            raise ValueError("truncated item")
        items.append(data[pos : pos + length])
        pos += length
    return items
