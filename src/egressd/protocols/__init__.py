"""Sans-I/O protocol codecs: bytes in, events out; no sockets, no asyncio, no clock."""
