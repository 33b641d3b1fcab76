#!/usr/bin/env python3
"""A userspace WAN link for bench/wan.sh: a TCP proxy that adds round-trip latency and caps the
bandwidth each way, and counts the HTTP requests that cross it by kind.

    wanlink.py --listen 127.0.0.1:9000 --target 127.0.0.1:9100 --rtt-ms 40 \
               --up-mbit 50 --down-mbit 200 --stats run.json

The link model, per direction (up = client -> server, down = server -> client): one bottleneck shared
by every connection, FIFO. A chunk read from one side is serialized at the rate after the chunks
before it (a token bucket with no burst), then propagates for RTT/2 before it is written to the other
side; the reading side waits while the link is busy, so senders see back-pressure as from a full
socket buffer. A new connection costs one RTT (the TCP handshake) before its first byte moves. Not
modelled: TCP slow start and window limits (the proxy talks loopback TCP on both sides), loss.

Counting: the client -> server stream is parsed as HTTP/1.1 (request line, headers, Content-Length
or chunked body), so requests are counted for every client alike: PUT, PART (PUT ?partNumber= or
Azure ?comp=block), MPU_CREATE (POST ?uploads), MPU_COMPLETE (POST ?uploadId=, Azure
?comp=blocklist), GET, HEAD, LIST (GET ?list-type= / ?comp=list / a bucket or container), DELETE,
BULK_DELETE (POST ?delete), OTHER. Bytes are what crosses the link each way, headers included.
Responses are parsed too, for the count of status codes (1xx interim answers not counted).

Link drop: SIGUSR1 (or --drop-at SECONDS after start) takes the link down for --drop-secs. Mode
`stall` (default, what a real outage does to TCP): nothing moves either way and new connections wait;
everything resumes afterwards. Mode `reset`: every open connection is reset and new ones are closed
at once until the link is back.

Stats go to --stats as JSON when the proxy ends (SIGTERM/SIGINT) and every second while it runs.
"""
import argparse
import asyncio
import json
import os
import signal
import time
from collections import Counter


BURST_S = 0.005


def parse_addr(s):
    host, port = s.rsplit(":", 1)
    return host, int(port)


class Direction:
    """One side of the link: a FIFO bottleneck of `rate` bytes/s and a one-way delay."""

    def __init__(self, mbit, delay):
        self.rate = mbit * 1e6 / 8 if mbit > 0 else 0
        self.delay = delay
        self.next_free = 0.0
        self.bytes = 0

    def schedule(self, n):
        """Bytes n enter the link now: (time the link is free again, time they arrive)."""
        now = time.monotonic()
        # A little credit for the time a sleeping sender overslept (timer slack, a busy loop), so
        # that the long-run rate is the configured one: a bucket of BURST_S seconds' worth of bytes.
        start = max(now - BURST_S, self.next_free)
        done = start + (n / self.rate if self.rate else 0)
        self.next_free = done
        self.bytes += n
        return done, done + self.delay


class Link:
    def __init__(self, args):
        self.args = args
        self.up = Direction(args.up_mbit, args.rtt_ms / 2000)
        self.down = Direction(args.down_mbit, args.rtt_ms / 2000)
        self.kinds = Counter()
        self.statuses = Counter()
        self.body_up = Counter()  # request body bytes by kind
        self.connections = 0
        self.down_until = 0.0
        self.drops = []
        self.open = set()
        self.started = time.monotonic()

    def is_down(self):
        return time.monotonic() < self.down_until

    async def wait_up(self):
        while self.is_down():
            await asyncio.sleep(max(0.0, self.down_until - time.monotonic()))

    def drop(self):
        secs = self.args.drop_secs
        self.down_until = time.monotonic() + secs
        self.drops.append({"at_s": round(time.monotonic() - self.started, 3), "secs": secs,
                           "mode": self.args.drop_mode, "bytes_up_at": self.up.bytes,
                           "bytes_down_at": self.down.bytes, "open_connections": len(self.open)})
        if self.args.drop_mode == "reset":
            for w in list(self.open):
                try:
                    w.transport.abort()
                except Exception:
                    pass

    def stats(self):
        return {
            "rtt_ms": self.args.rtt_ms, "up_mbit": self.args.up_mbit,
            "down_mbit": self.args.down_mbit,
            "seconds": round(time.monotonic() - self.started, 3),
            "bytes_up": self.up.bytes, "bytes_down": self.down.bytes,
            "connections": self.connections,
            "requests": dict(self.kinds), "requests_total": sum(self.kinds.values()),
            "request_body_bytes": dict(self.body_up),
            "statuses": {str(k): v for k, v in self.statuses.items()},
            "drops": self.drops,
        }

    def write_stats(self):
        if self.args.stats:
            tmp = self.args.stats + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.stats(), f, indent=1, sort_keys=True)
            os.replace(tmp, self.args.stats)


def classify(method, target):
    path, _, query = target.partition("?")
    q = {p.split("=", 1)[0] for p in query.split("&") if p}
    # path-style: /bucket/key…; a request on the bucket itself has no key
    parts = [p for p in path.split("/") if p]
    if method == "PUT":
        if "partNumber" in q or ("comp" in q and "comp=block" in query and "comp=blocklist" not in query):
            return "PART"
        if "comp=blocklist" in query:
            return "MPU_COMPLETE"
        return "PUT"
    if method == "POST":
        if "uploads" in q:
            return "MPU_CREATE"
        if "uploadId" in q:
            return "MPU_COMPLETE"
        if "delete" in q:
            return "BULK_DELETE"
        return "OTHER"
    if method == "GET":
        if "list-type" in q or "comp=list" in query or len(parts) <= 1:
            return "LIST"
        return "GET"
    if method in ("HEAD", "DELETE"):
        if method == "DELETE" and "uploadId" in q:
            return "MPU_ABORT"
        return method
    return "OTHER"


class HttpParser:
    """Incremental HTTP/1.1 message parser: calls on_message(start_line, headers, body_len) per
    message. For responses, `methods` (a list shared with the request side) says which answers
    have no body (HEAD)."""

    def __init__(self, on_message, response=False, methods=None):
        self.buf = bytearray()
        self.on_message = on_message
        self.response = response
        self.methods = methods
        self.state = "head"
        self.left = 0
        self.body_len = 0
        self.current = None
        self.broken = False

    def feed(self, data):
        if self.broken:
            return
        self.buf += data
        try:
            self._run()
        except Exception:
            self.broken = True

    def _run(self):
        while True:
            if self.state == "head":
                i = self.buf.find(b"\r\n\r\n")
                if i < 0:
                    return
                head = bytes(self.buf[:i]).decode("latin-1")
                del self.buf[: i + 4]
                lines = head.split("\r\n")
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(":")
                    headers[k.strip().lower()] = v.strip()
                self.current = (lines[0], headers)
                self.body_len = 0
                if self.response:
                    code = int(lines[0].split()[1])
                    if 100 <= code < 200:
                        continue  # interim (100 Continue): the real answer follows
                    method = self.methods.pop(0) if self.methods else "GET"
                    if method == "HEAD" or code in (204, 304):
                        self._done()
                        continue
                if headers.get("transfer-encoding", "").lower().endswith("chunked"):
                    self.state = "chunk-size"
                elif "content-length" in headers:
                    self.left = int(headers["content-length"])
                    self.state = "body"
                    if self.left == 0:
                        self._done()
                else:
                    self._done()
            elif self.state == "body":
                n = min(self.left, len(self.buf))
                del self.buf[:n]
                self.left -= n
                self.body_len += n
                if self.left:
                    return
                self._done()
            elif self.state == "chunk-size":
                i = self.buf.find(b"\r\n")
                if i < 0:
                    return
                size = int(bytes(self.buf[:i]).split(b";")[0], 16)
                del self.buf[: i + 2]
                if size == 0:
                    self.state = "trailer"
                else:
                    self.left = size + 2
                    self.body_len += size
                    self.state = "chunk"
            elif self.state == "chunk":
                n = min(self.left, len(self.buf))
                del self.buf[:n]
                self.left -= n
                if self.left:
                    return
                self.state = "chunk-size"
            elif self.state == "trailer":
                i = self.buf.find(b"\r\n")
                if i < 0:
                    return
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                if not line:
                    self._done()

    def _done(self):
        self.state = "head"
        self.on_message(self.current[0], self.current[1], self.body_len)


async def pump(link, direction, reader, writer, parser):
    """Move bytes from reader to writer across one direction of the link."""
    queue = asyncio.Queue(maxsize=256)

    async def deliver():
        while True:
            item = await queue.get()
            if item is None:
                break
            arrive, data = item
            now = time.monotonic()
            if arrive > now:
                await asyncio.sleep(arrive - now)
            await link.wait_up()
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    task = asyncio.ensure_future(deliver())
    try:
        while True:
            await link.wait_up()
            data = await reader.read(262144)
            if not data:
                break
            await link.wait_up()
            if parser:
                parser.feed(data)
            free, arrive = direction.schedule(len(data))
            await queue.put((arrive, data))
            now = time.monotonic()
            if free > now:
                await asyncio.sleep(free - now)
    except (ConnectionError, OSError):
        pass
    finally:
        await queue.put(None)
        try:
            await task
        except (ConnectionError, OSError):
            pass


async def handle(link, creader, cwriter):
    args = link.args
    if link.is_down() and args.drop_mode == "reset":
        cwriter.transport.abort()
        return
    link.connections += 1
    # The TCP handshake costs one round trip before the first byte moves.
    await asyncio.sleep(args.rtt_ms / 1000)
    await link.wait_up()
    try:
        sreader, swriter = await asyncio.open_connection(*parse_addr(args.target))
    except OSError:
        cwriter.close()
        return
    link.open.add(cwriter)
    link.open.add(swriter)
    methods = []

    def on_request(line, headers, body_len):
        method, target = (line.split(" ") + ["", ""])[:2]
        kind = classify(method, target)
        link.kinds[kind] += 1
        link.body_up[kind] += body_len
        methods.append(method)

    def on_response(line, headers, body_len):
        link.statuses[int(line.split()[1])] += 1

    req_parser = HttpParser(on_request)
    resp_parser = HttpParser(on_response, response=True, methods=methods)
    try:
        await asyncio.gather(pump(link, link.up, creader, swriter, req_parser),
                             pump(link, link.down, sreader, cwriter, resp_parser))
    finally:
        for w in (cwriter, swriter):
            link.open.discard(w)
            try:
                w.close()
            except Exception:
                pass


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    ap.add_argument("--target", required=True, help="HOST:PORT of the server")
    ap.add_argument("--rtt-ms", type=float, default=40)
    ap.add_argument("--up-mbit", type=float, default=50, help="client -> server, 0 = no cap")
    ap.add_argument("--down-mbit", type=float, default=200, help="server -> client, 0 = no cap")
    ap.add_argument("--stats", help="write the counts here (JSON)")
    ap.add_argument("--drop-secs", type=float, default=10)
    ap.add_argument("--drop-mode", choices=["stall", "reset"], default="stall")
    ap.add_argument("--drop-at", type=float, help="drop the link this many seconds after start")
    ap.add_argument("--drop-at-up-bytes", type=int,
                    help="drop the link once this many bytes went up")
    args = ap.parse_args()
    link = Link(args)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, link.drop)
    host, port = parse_addr(args.listen)
    server = await asyncio.start_server(lambda r, w: handle(link, r, w), host, port,
                                        reuse_address=True, backlog=1024)

    async def ticker():
        dropped = False
        while True:
            await asyncio.sleep(0.2 if args.drop_at_up_bytes else 1)
            if args.drop_at_up_bytes and not dropped and link.up.bytes >= args.drop_at_up_bytes:
                dropped = True
                link.drop()
            link.write_stats()

    tick = asyncio.ensure_future(ticker())
    if args.drop_at is not None:
        loop.call_later(args.drop_at, link.drop)
    await stop.wait()
    tick.cancel()
    server.close()
    link.write_stats()


if __name__ == "__main__":
    asyncio.run(main())
