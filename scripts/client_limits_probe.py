#!/usr/bin/env python3
"""Measure what slow and idle clients cost shadowgate, on loopback only.

    scripts/client_limits_probe.py BINARY idle N [KIND] [read_buffer_bytes]
                                                    RSS per idle keep-alive connection; KIND is
                                                    h1 (default), tls (HTTP/1.1 over TLS), h2c or
                                                    h2 (over TLS); BINARY `nginx` measures NGINX
                                                    (one worker) with the same clients. Then N
                                                    more connections, opened once the first N
                                                    have idled: what they add shows memory the
                                                    idle ones gave back (a process left idle
                                                    keeps freed pages in its RSS)
    scripts/client_limits_probe.py BINARY slowloris N                  slowloris connections closed in time
    scripts/client_limits_probe.py BINARY kill [retry_idempotent]      502s when one of two origins is killed

BINARY is a built shadowgate (e.g. target/release/shadowgate). Each mode starts its own
origins and proxy on free 127.0.0.1 ports and stops them at the end. Raise `ulimit -n`
above 2*N + 100 first.
"""
import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLOSE_EACH = False


async def origin_conn(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if length:
                await reader.readexactly(length)
            writer.write(RESPONSE)
            await writer.drain()
            if CLOSE_EACH:
                break
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def serve_origin(port):
    server = await asyncio.start_server(origin_conn, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def start_origin(port, close_each=False):
    """An origin in its own process, so it can be killed like a real one."""
    p = subprocess.Popen([sys.executable, __file__, "-", "origin", str(port)] + (["close"] if close_each else []))
    wait_port(port)
    return p


def wait_port(port, deadline=20):
    end = time.time() + deadline
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def start_proxy(binary, origins, client="", pool_extra="", listener_extra=""):
    d = tempfile.mkdtemp()
    os.chmod(d, 0o700)
    port = free_port()
    servers = "\n".join(f'      - {{ address: "127.0.0.1:{o}" }}' for o in origins)
    client_line = f"    client: {client}\n" if client else ""
    conf = (
        f"threads: 2\npid_file: {d}/pid\nupgrade_sock: {d}/sock\n"
        f"grace_period_seconds: 1\ngraceful_shutdown_timeout_seconds: 1\n"
        f'listeners:\n  - address: "127.0.0.1:{port}"\n{listener_extra}{client_line}'
        f"upstreams:\n  app:\n    servers:\n{servers}\n{pool_extra}"
        f"routes:\n  - {{ name: all, upstream: app }}\n"
    )
    with open(f"{d}/c.yaml", "w") as f:
        f.write(conf)
    log = open(f"{d}/log", "w")
    p = subprocess.Popen([binary, "-c", f"{d}/c.yaml"], stderr=log, stdout=subprocess.DEVNULL)
    wait_port(port)
    p.log_path = f"{d}/log"
    return p, port


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def self_signed(d):
    """A throwaway certificate and key for the TLS kinds."""
    cert, key = f"{d}/cert.pem", f"{d}/key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-subj", "/CN=localhost", "-days", "1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    return cert, key


def start_nginx(origin, kind, cert, key):
    """NGINX as a proxy on one worker, configured for `kind` as shadowgate is."""
    d = tempfile.mkdtemp()
    port = free_port()
    listen = {"h1": "", "tls": " ssl", "h2c": " http2", "h2": " ssl http2"}[kind]
    certificate = f"ssl_certificate {cert}; ssl_certificate_key {key};" if "ssl" in listen else ""
    conf = (
        f"worker_processes 1; daemon off; pid {d}/pid; error_log {d}/err; worker_rlimit_nofile 100000;\n"
        f"events {{ worker_connections 50000; }}\n"
        f"http {{ access_log off; upstream o {{ server 127.0.0.1:{origin}; keepalive 32; }}\n"
        f"  server {{ listen 127.0.0.1:{port}{listen}; {certificate}\n"
        f"    location / {{ proxy_pass http://o; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}\n"
    )
    with open(f"{d}/nginx.conf", "w") as f:
        f.write(conf)
    p = subprocess.Popen(["nginx", "-c", f"{d}/nginx.conf"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    worker = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    p.measured_pid = int(worker[0])
    return p, port


# An HTTP/2 GET on stream 1: the preface, empty SETTINGS, then HEADERS (END_STREAM |
# END_HEADERS) with :method GET, :scheme, :path / from HPACK's static table and :authority x.
def h2_request(scheme_index):
    block = bytes([0x82, scheme_index, 0x84, 0x41, 0x01]) + b"x"
    return (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
            + len(block).to_bytes(3, "big") + b"\x01\x05\x00\x00\x00\x01" + block)


async def h2_answered(r, w):
    """Reads frames until stream 1 ends, acknowledging the server's SETTINGS."""
    while True:
        head = await r.readexactly(9)
        length, kind, flags, stream = int.from_bytes(head[:3], "big"), head[3], head[4], \
            int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
        await r.readexactly(length)
        if kind == 0x4 and not flags & 0x1:
            w.write(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
        if stream == 1 and kind in (0x0, 0x1) and flags & 0x1:
            return


async def kept_alive(port, kind="h1"):
    """A connection to the proxy on `port` that has had one answer and stays open."""
    tls = None
    if kind in ("tls", "h2"):
        tls = ssl.create_default_context()
        tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
        tls.set_alpn_protocols(["h2"] if kind == "h2" else ["http/1.1"])
    r, w = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    if kind in ("h2c", "h2"):
        w.write(h2_request(0x87 if tls else 0x86))
        await h2_answered(r, w)
    else:
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await r.readuntil(b"ok")
    return r, w


async def idle(binary, n, kind, read_buffer):
    o = free_port()
    origin = start_origin(o)
    d = tempfile.mkdtemp()
    cert, key = self_signed(d) if kind in ("tls", "h2") else (f"{d}/none", f"{d}/none")
    client = f"{{ read_buffer_bytes: {read_buffer}, max_connections_per_ip: 100000, max_connections: 100000 }}" \
        if read_buffer is not None else "{ max_connections_per_ip: 100000, max_connections: 100000 }"
    listener = {"h1": "", "h2c": "    h2c: true\n",
                "tls": f"    tls: {{ certificates: [{{ cert: {cert}, key: {key} }}], h2: false }}\n",
                "h2": f"    tls: {{ certificates: [{{ cert: {cert}, key: {key} }}] }}\n"}[kind]
    if binary == "nginx":
        proxy, port = start_nginx(o, kind, cert, key)
    else:
        proxy, port = start_proxy(binary, [o], client, listener_extra=listener)
        proxy.measured_pid = proxy.pid
    try:
        # Warm up the threads and pools with a few requests first.
        conns = []
        for _ in range(20):
            conns.append(await kept_alive(port, kind))
        await asyncio.sleep(1)
        before = rss_kib(proxy.measured_pid)
        for _ in range(n):
            conns.append(await kept_alive(port, kind))
        await asyncio.sleep(2)
        after = rss_kib(proxy.measured_pid)
        per = (after - before) * 1024 / n
        buffer = "" if binary == "nginx" else \
            f", read_buffer_bytes={'default' if read_buffer is None else read_buffer}"
        print(f"idle keep-alive {kind}: {n} connections, RSS {before/1024:.1f} -> {after/1024:.1f} MiB, "
              f"{per:.0f} bytes per connection ({os.path.basename(binary)}{buffer})")
        for _ in range(n):
            conns.append(await kept_alive(port, kind))
        await asyncio.sleep(2)
        more = rss_kib(proxy.measured_pid)
        print(f"  {n} more once those had idled: RSS -> {more/1024:.1f} MiB, "
              f"{(more - after) * 1024 / n:.0f} bytes per connection")
        for _, w in conns:
            w.close()
    finally:
        proxy.kill()
        origin.kill()


async def slowloris(binary, n):
    o = free_port()
    origin = start_origin(o)
    proxy, port = start_proxy(binary, [o], "{ max_connections_per_ip: 100000, max_connections: 100000 }")
    try:
        closed_at = []
        start = time.time()

        async def one():
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            try:
                while time.time() - start < 60:
                    try:
                        await asyncio.wait_for(r.read(1), 5)
                        closed_at.append(time.time() - start)
                        return
                    except asyncio.TimeoutError:
                        w.write(b"a")
                        await w.drain()
            except ConnectionError:
                closed_at.append(time.time() - start)
            finally:
                w.close()

        await asyncio.gather(*(one() for _ in range(n)))
        within = sum(1 for t in closed_at if t <= 12)
        print(f"slowloris: {n} connections (a byte every 5 s), {len(closed_at)} closed by the proxy, "
              f"{within} within 12 s; latest close at {max(closed_at, default=0):.1f} s")
    finally:
        proxy.kill()
        origin.kill()


async def kill(binary, retry):
    a, b = free_port(), free_port()
    # Origins close after each response, so every request is on a fresh upstream connection,
    # the case Pingora does not retry by itself.
    oa, ob = start_origin(a, True), start_origin(b, True)
    extra = "" if retry else "    retry_idempotent: false\n"
    proxy, port = start_proxy(binary, [a, b], "{ max_connections_per_ip: 100000, max_connections: 100000 }", extra)
    statuses = {}
    try:
        stop = time.time() + 4

        async def worker():
            while time.time() < stop:
                try:
                    r, w = await asyncio.open_connection("127.0.0.1", port)
                    while time.time() < stop:
                        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                        head = await r.readuntil(b"\r\n\r\n")
                        status = int(head.split()[1])
                        length = [int(l.split(b":")[1]) for l in head.split(b"\r\n")
                                  if l.lower().startswith(b"content-length:")]
                        await r.readexactly(length[0] if length else 0)
                        statuses[status] = statuses.get(status, 0) + 1
                        if b"connection: close" in head.lower():
                            break
                    w.close()
                except (ConnectionError, asyncio.IncompleteReadError):
                    statuses["conn-error"] = statuses.get("conn-error", 0) + 1

        async def killer():
            await asyncio.sleep(1.5)
            ob.send_signal(signal.SIGKILL)

        await asyncio.gather(killer(), *(worker() for _ in range(32)))
        print(f"kill one of two origins under load (retry_idempotent={retry}): {statuses}")
        if os.environ.get("SHOW_ERRORS"):
            with open(proxy.log_path) as f:
                errors = [line for line in f if "ERROR" in line]
            print("".join(errors[:8]))
    finally:
        proxy.kill()
        oa.kill()
        ob.kill()


def main():
    if sys.argv[1] == "-":
        global CLOSE_EACH
        CLOSE_EACH = sys.argv[4:] == ["close"]
        asyncio.run(serve_origin(int(sys.argv[3])))
        return
    binary, mode = sys.argv[1], sys.argv[2]
    if mode == "idle":
        rest = sys.argv[4:]
        kind = rest.pop(0) if rest and not rest[0].isdigit() else "h1"
        if kind not in ("h1", "tls", "h2c", "h2"):
            raise SystemExit(__doc__)
        asyncio.run(idle(binary, int(sys.argv[3]), kind, int(rest[0]) if rest else None))
    elif mode == "slowloris":
        asyncio.run(slowloris(binary, int(sys.argv[3])))
    elif mode == "kill":
        asyncio.run(kill(binary, (sys.argv[3] if len(sys.argv) > 3 else "true") == "true"))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
