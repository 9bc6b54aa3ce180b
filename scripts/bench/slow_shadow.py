#!/usr/bin/env python3
"""A deliberately slow shadow upstream for scripts/bench.sh.

HTTP/1.1 with keep-alive on 127.0.0.1: reads each request in full
(Content-Length or chunked body), waits --delay-ms, answers 200 "slow\n".
GET /__bench_status answers at once with the number of requests answered so
far ("requests N"), so the harness can check how many mirrored requests arrived.
Standard library only.
"""

import argparse
import asyncio
import os
import signal

STATS = {"requests": 0, "started": 0}


async def read_body(reader, headers):
    te = headers.get("transfer-encoding", "").lower()
    if "chunked" in te:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("eof in chunk size")
            size = int(line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                # Trailers, up to the empty line.
                while True:
                    t = await reader.readline()
                    if t in (b"\r\n", b"\n", b""):
                        return
            await reader.readexactly(size)
            await reader.readline()
    length = int(headers.get("content-length", "0") or "0")
    remaining = length
    while remaining > 0:
        chunk = await reader.read(min(remaining, 1 << 20))
        if not chunk:
            raise ConnectionError("eof in body")
        remaining -= len(chunk)


async def handle(reader, writer, delay):
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            if line in (b"\r\n", b"\n"):
                continue
            parts = line.decode("latin-1").split()
            if len(parts) < 3:
                return
            method, target, version = parts[0], parts[1], parts[2]
            headers = {}
            while True:
                h = await reader.readline()
                if not h:
                    return
                if h in (b"\r\n", b"\n"):
                    break
                name, _, value = h.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await read_body(reader, headers)
            close = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
            if target == "/__bench_status":
                body = f"requests {STATS['requests']}\nstarted {STATS['started']}\n".encode()
            else:
                STATS["started"] += 1
                await asyncio.sleep(delay)
                STATS["requests"] += 1
                body = b"slow\n"
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\n"
                + ("Connection: close\r\n" if close else "")
                + "\r\n"
            ).encode()
            writer.write(head + body)
            await writer.drain()
            if close:
                return
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        return
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--delay-ms", type=int, default=500)
    args = ap.parse_args()
    delay = args.delay_ms / 1000.0
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, delay), "127.0.0.1", args.port, backlog=4096, limit=1 << 20
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    # Open keep-alive connections would only produce cancellation noise: leave now.
    os._exit(0)


if __name__ == "__main__":
    asyncio.run(main())
