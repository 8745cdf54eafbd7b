"""Bounded request decompression (``Content-Encoding: gzip`` / ``deflate``).

A :class:`Decoder` never produces more than :data:`DECODE_PIECE` bytes per call (or one
byte past its limit): the rest of the input waits in zlib's ``unconsumed_tail`` for the
next call, so a small compressed body cannot become a large buffer at once. It caps the
decoded size and the expansion ratio, decodes every member of a multi-member gzip body
(``pigz``, ``cat a.gz b.gz``), and refuses trailing bytes that are not one.
"""

from __future__ import annotations

import zlib

from memguard.errors import BodyTooLarge, MalformedRequest

__all__ = ["DECODE_PIECE", "RATIO_FLOOR", "Decoder"]

# The largest decoded piece handed to the app at once, and the decoded size below which
# the expansion ratio is not judged (small JSON compresses 100x honestly).
DECODE_PIECE = 256 * 1024
RATIO_FLOOR = 1024 * 1024


class Decoder:
    """Streaming gzip/deflate decoding with a cap on decoded bytes and on expansion."""

    __slots__ = ("_z", "_wbits", "_gzip", "_rest", "encoded", "decoded", "limit", "ratio")

    def __init__(self, encoding: bytes, limit: int | None, ratio: float) -> None:
        self._gzip = encoding != b"deflate"
        self._wbits = 16 + zlib.MAX_WBITS if self._gzip else zlib.MAX_WBITS
        self._z = zlib.decompressobj(self._wbits)
        self._rest = b""  # what followed a finished gzip member: the next one's start
        self.encoded = 0
        self.decoded = 0
        self.limit = limit
        self.ratio = ratio

    @property
    def pending(self) -> bool:
        """Input is waiting to be decoded (call :meth:`feed` with ``b""``)."""
        return bool(self._z.unconsumed_tail or self._rest)

    def feed(self, data: bytes) -> bytes:
        """Decode from ``data`` (after any pending input); ``b""`` continues the tail."""
        self.encoded += len(data)
        z = self._z
        if z.eof:
            source, self._rest = self._rest + data, b""
            if not source:
                return b""
            if not self._gzip:
                raise MalformedRequest("data after the end of the compressed body",
                                       reason="body_decode_error", encoded=self.encoded)
            z = self._z = zlib.decompressobj(self._wbits)  # the next gzip member
        else:
            source = z.unconsumed_tail + data if z.unconsumed_tail else data
        room = DECODE_PIECE if self.limit is None else min(DECODE_PIECE,
                                                           self.limit - self.decoded + 1)
        try:
            out = z.decompress(source, max(room, 1))
        except zlib.error as exc:
            raise MalformedRequest("request body could not be decoded",
                                   reason="body_decode_error", error=str(exc)) from None
        if z.eof:
            self._rest = z.unused_data
        self.decoded += len(out)
        if self.limit is not None and self.decoded > self.limit:
            raise BodyTooLarge(
                f"decoded request body is over the limit of {self.limit} bytes",
                reason="decoded_body_over_limit", limit=self.limit, decoded=self.decoded,
                encoded=self.encoded)
        if (self.ratio and self.decoded > RATIO_FLOOR
                and self.decoded > self.ratio * self.encoded):
            raise BodyTooLarge(
                "request body expands too much when decoded", reason="decompression_ratio",
                ratio=round(self.decoded / max(self.encoded, 1), 1), max_ratio=self.ratio,
                decoded=self.decoded, encoded=self.encoded)
        return out

    def finish(self) -> None:
        """The body has ended: it must end with a whole compressed stream."""
        if not self._z.eof or self._rest:
            raise MalformedRequest("compressed request body is truncated",
                                   reason="body_decode_error", encoded=self.encoded)

    def lift_limits(self) -> None:
        """Report-only: a limit was reported once; decode the rest without limits."""
        self.limit = None
        self.ratio = 0
