#!/usr/bin/env python3
"""An HTTP/3 client for the cluster tests, built on aioquic (not on anything in this repo).

Connects to ADDR:PORT over QUIC, verifies the server certificate against --cacert for the
name in --host (sent as SNI and :authority), sends --count requests one after another on the
same connection and prints one JSON object per request on stdout:

  {"status": 200, "headers": {...}, "body": "...", "body_len": N,
   "chunk_ms": [...], "first_byte_ms": F, "total_ms": T, "peer_subject": "CN=..."}

A request body is sent with --body-bytes N (N bytes in --chunk-bytes pieces, each flushed on
its own so the body really streams), declared as `content-length: N` (or --content-length, to
declare a length the body does not have). A connection that cannot be set up prints
{"error": "...", "phase": "handshake", "close_code": C, "reason": "..."} and exits 3; a
connection or stream torn down mid-request prints the same with "phase": "request", exit 4.
"""

import argparse
import asyncio
import json
import sys
import time

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3_ALPN, H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import ConnectionTerminated, StreamReset


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.waiters = {}
        self.results = {}
        self.terminated = None

    def quic_event_received(self, event):
        if isinstance(event, ConnectionTerminated):
            self.terminated = (event.error_code, event.reason_phrase)
            for sid, fut in self.waiters.items():
                if not fut.done():
                    fut.set_exception(ConnectionError("connection closed"))
            return
        if isinstance(event, StreamReset):
            fut = self.waiters.get(event.stream_id)
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(f"stream reset with code {event.error_code:#x}"))
            return
        for ev in self.h3.handle_event(event):
            res = self.results.get(getattr(ev, "stream_id", None))
            if res is None:
                continue
            now = time.monotonic()
            if isinstance(ev, HeadersReceived):
                if res["status"] is None:
                    for k, v in ev.headers:
                        k, v = k.decode(), v.decode(errors="replace")
                        if k == ":status":
                            res["status"] = int(v)
                        elif k in res["headers"]:
                            res["headers"][k] += ", " + v
                        else:
                            res["headers"][k] = v
                else:
                    res["trailers"] = {k.decode(): v.decode(errors="replace") for k, v in ev.headers}
            elif isinstance(ev, DataReceived):
                if ev.data:
                    res["chunks"].append(ev.data)
                    res["chunk_at"].append(now)
            if ev.stream_ended:
                fut = self.waiters.get(ev.stream_id)
                if fut is not None and not fut.done():
                    fut.set_result(None)

    async def request(self, method, authority, path, headers, body_bytes, chunk_bytes, declared):
        sid = self._quic.get_next_available_stream_id()
        fut = asyncio.get_running_loop().create_future()
        self.waiters[sid] = fut
        res = {"status": None, "headers": {}, "chunks": [], "chunk_at": []}
        self.results[sid] = res
        start = time.monotonic()
        hdrs = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
            (b"user-agent", b"aioquic-h3-test"),
        ] + [(k.lower().encode(), v.encode()) for k, v in headers]
        if declared is None and body_bytes:
            declared = body_bytes
        if declared is not None:
            hdrs.append((b"content-length", str(declared).encode()))
        self.h3.send_headers(sid, hdrs, end_stream=body_bytes == 0)
        self.transmit()
        sent = 0
        while sent < body_bytes:
            n = min(chunk_bytes, body_bytes - sent)
            sent += n
            self.h3.send_data(sid, b"x" * n, end_stream=sent == body_bytes)
            self.transmit()
            # Let the event loop send what flow control allows before the next piece.
            await asyncio.sleep(0)
        await fut
        body = b"".join(res["chunks"])
        out = {
            "status": res["status"],
            "headers": res["headers"],
            "body": body.decode(errors="replace"),
            "body_len": len(body),
            "chunk_ms": [round((t - start) * 1000, 2) for t in res["chunk_at"]],
            "first_byte_ms": round((res["chunk_at"][0] - start) * 1000, 2) if res["chunk_at"] else None,
            "total_ms": round((time.monotonic() - start) * 1000, 2),
        }
        if "trailers" in res:
            out["trailers"] = res["trailers"]
        # The certificate the server showed, so tests can watch a rotation arrive.
        cert = getattr(self._quic.tls, "_peer_certificate", None)
        if cert is not None:
            out["peer_subject"] = cert.subject.rfc4514_string()
        return out


def fail(phase, err, client, code):
    out = {"error": str(err) or type(err).__name__, "phase": phase}
    if client is not None and client.terminated is not None:
        out["close_code"] = client.terminated[0]
        out["reason"] = client.terminated[1]
    print(json.dumps(out), flush=True)
    return code


async def run(args):
    cfg = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN, server_name=args.host)
    cfg.load_verify_locations(args.cacert)
    made = []

    def factory(*a, **kw):
        made.append(H3Client(*a, **kw))
        return made[-1]

    authority = args.authority or f"{args.host}:{args.port}"
    try:
        async with connect(args.addr, args.port, configuration=cfg, create_protocol=factory) as client:
            for _ in range(args.count):
                try:
                    out = await asyncio.wait_for(
                        client.request(
                            args.method,
                            authority,
                            args.path,
                            [h.split(":", 1) for h in args.header],
                            args.body_bytes,
                            args.chunk_bytes,
                            args.content_length,
                        ),
                        args.timeout,
                    )
                except (ConnectionError, asyncio.TimeoutError) as e:
                    return fail("request", e, client, 4)
                print(json.dumps(out), flush=True)
            return 0
    except (ConnectionError, asyncio.TimeoutError, OSError) as e:
        return fail("handshake", e, made[0] if made else None, 3)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--addr", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", required=True, help="TLS server name and default :authority")
    p.add_argument("--authority", help=":authority when it should differ from --host:--port")
    p.add_argument("--cacert", required=True)
    p.add_argument("--method", default="GET")
    p.add_argument("--path", default="/")
    p.add_argument("--header", action="append", default=[], help="NAME:VALUE (repeatable)")
    p.add_argument("--body-bytes", type=int, default=0)
    p.add_argument("--chunk-bytes", type=int, default=16384)
    p.add_argument("--content-length", help="content-length to declare (default: --body-bytes)")
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=15.0)
    args = p.parse_args()
    try:
        return asyncio.run(asyncio.wait_for(run(args), args.timeout * (args.count + 1)))
    except asyncio.TimeoutError as e:
        return fail("timeout", e, None, 5)


if __name__ == "__main__":
    sys.exit(main())
