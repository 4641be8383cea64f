#!/usr/bin/env python3
"""Opens N connections to 127.0.0.1:PORT at once, sends `version` on each,
and prints how long until every one has answered. Usage:
    python3 benches/burst.py PORT [N]      (N defaults to 1000; raise `ulimit -n` first)
"""
import asyncio
import sys
import time


async def one(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"version\r\n")
    await writer.drain()
    line = await reader.readline()
    return writer, line.startswith(b"VERSION")


async def main(port, n):
    started = time.monotonic()
    results = await asyncio.gather(*[one(port) for _ in range(n)], return_exceptions=True)
    took = time.monotonic() - started
    answered = sum(1 for r in results if not isinstance(r, BaseException) and r[1])
    for r in results:
        if not isinstance(r, BaseException):
            r[0].close()
    print(f"{n} connections, {answered} answered, {took * 1000:.0f} ms")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1000))
