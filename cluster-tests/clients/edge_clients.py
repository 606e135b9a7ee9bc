#!/usr/bin/env python3
"""Outside clients for the data-plane tests (cluster-tests/tests/t71_outside_clients.rs).

Written against the Python standard library, httpx and h2 (Debian: python3-httpx, python3-h2),
none of which share code with the gateway. Every subcommand connects to 127.0.0.1:PORT with
SNI and Host set to HOST, verifies the server certificate against --ca, and prints one JSON
object on stdout.

  httpx     GET with httpx over HTTP/1.1 or HTTP/2 (--http2)
  websocket RFC 6455 handshake and one masked text frame, expecting it echoed
  websocket-h2  the same WebSocket over HTTP/2 extended CONNECT (RFC 8441), with the h2 library
  slowloris send request headers one byte every --interval seconds; report when the server
            gives up on us
  rapid-reset  HTTP/2: open and immediately reset --streams streams (CVE-2023-44487) and
            report whether the server ended the connection with GOAWAY
  h2-request  HTTP/2: one request with --method and --path sent exactly as given (h2's own
            header checks off, so a malformed :path reaches the server); prints the status and
            body, or the stream's reset code
  raw-h1    HTTP/1.1 over TLS: sends --data (Python escapes such as \\r\\n decoded) and prints
            the response's status line
"""

import argparse
import base64
import hashlib
import json
import os
import socket
import ssl
import sys
import time


def tls_context(ca, alpn):
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(alpn)
    return ctx


def connect(args, alpn):
    raw = socket.create_connection(("127.0.0.1", args.port), timeout=10)
    return tls_context(args.ca, alpn).wrap_socket(raw, server_hostname=args.host)


def pin_host(host, port):
    """Like curl --resolve: HOST resolves to 127.0.0.1 in this process, so httpx sends SNI and
    checks the certificate for HOST itself."""
    real = socket.getaddrinfo

    def getaddrinfo(h, p, *rest, **kw):
        if h == host:
            h = "127.0.0.1"
        return real(h, p, *rest, **kw)

    socket.getaddrinfo = getaddrinfo


def cmd_httpx(args):
    import httpx

    pin_host(args.host, args.port)
    with httpx.Client(
        verify=tls_context(args.ca, ["h2", "http/1.1"] if args.http2 else ["http/1.1"]),
        http2=args.http2,
        http1=not args.http2,
        timeout=10,
    ) as client:
        r = client.get(f"https://{args.host}:{args.port}{args.path}")
        return {"status": r.status_code, "http_version": r.http_version, "body": r.text}


def read_until(sock, marker, limit=65536):
    buf = b""
    while marker not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit:
            break
    return buf


def ws_frame(payload):
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    n = len(payload)
    if n < 126:
        header = bytes([0x81, 0x80 | n])
    else:
        header = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    return header + mask + masked


def split_ws_frame(buf):
    """One unmasked server frame from the front of buf: (opcode, text, rest), or None while
    incomplete."""
    if len(buf) < 2:
        return None
    n, off = buf[1] & 0x7F, 2
    if n >= 126:
        width = 2 if n == 126 else 8
        if len(buf) < 2 + width:
            return None
        n, off = int.from_bytes(buf[2 : 2 + width], "big"), 2 + width
    if len(buf) < off + n:
        return None
    return buf[0] & 0x0F, buf[off : off + n].decode(), buf[off + n :]


def cmd_websocket(args):
    sock = connect(args, ["http/1.1"])
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET {args.path} HTTP/1.1\r\nHost: {args.host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = read_until(sock, b"\r\n\r\n").decode(errors="replace")
    status = int(head.split(" ", 2)[1]) if head.startswith("HTTP/1.1 ") else 0
    expected = base64.b64encode(
        hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()
    ).decode()
    accept_ok = f"sec-websocket-accept: {expected}".lower() in head.lower()
    echoes = []
    if status == 101:
        for text in ("hello through the gateway", "x" * 300):
            sock.sendall(ws_frame(text.encode()))
            buf = b""
            while (frame := split_ws_frame(buf)) is None:
                chunk = sock.recv(4096)
                if not chunk:
                    raise EOFError("connection closed mid-frame")
                buf += chunk
            opcode, reply, _ = frame
            # The demo app echoes "<instance-id>: <text>".
            echoes.append({"opcode": opcode, "echoed": reply.endswith(": " + text)})
    sock.close()
    return {"status": status, "accept_ok": accept_ok, "echoes": echoes}


def h2_connect(args):
    """A TLS connection that negotiated h2 and has sent the client preface: (sock, conn), or
    (None, error result) when the server chose another protocol."""
    import h2.config
    import h2.connection

    sock = connect(args, ["h2"])
    if sock.selected_alpn_protocol() != "h2":
        return None, {"error": f"ALPN chose {sock.selected_alpn_protocol()!r}"}
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def cmd_websocket_h2(args):
    import h2.events

    sock, conn = h2_connect(args)
    if sock is None:
        return conn
    # Extended CONNECT may only be sent once the server has announced it (RFC 8441 §3).
    enabled = None
    while enabled is None:
        data = sock.recv(65536)
        if not data:
            return {"error": "connection closed before SETTINGS"}
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.RemoteSettingsChanged):
                enabled = conn.remote_settings.enable_connect_protocol
        sock.sendall(conn.data_to_send())
    result = {"enable_connect_protocol": enabled, "status": 0, "echoes": []}
    if enabled != 1:
        return result
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [
            (":method", "CONNECT"),
            (":protocol", "websocket"),
            (":scheme", "https"),
            (":authority", args.host),
            (":path", args.path),
            ("sec-websocket-version", "13"),
        ],
    )
    sock.sendall(conn.data_to_send())
    buf = b""
    texts = ["hello over HTTP/2", "y" * 300]
    sent = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(result["echoes"]) < len(texts):
        data = sock.recv(65536)
        if not data:
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                result["status"] = int(dict(ev.headers)[b":status"])
                result["accept_header"] = b"sec-websocket-accept" in dict(ev.headers)
                if result["status"] == 200:
                    conn.send_data(sid, ws_frame(texts[0].encode()))
                    sent = 1
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                buf += ev.data
                while (frame := split_ws_frame(buf)) is not None:
                    opcode, reply, buf = frame
                    text = texts[len(result["echoes"])]
                    result["echoes"].append(
                        {"opcode": opcode, "echoed": reply.endswith(": " + text)}
                    )
                    if sent < len(texts):
                        conn.send_data(sid, ws_frame(texts[sent].encode()))
                        sent += 1
            elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                result["reset"] = int(ev.error_code)
                deadline = 0
        sock.sendall(conn.data_to_send())
    sock.close()
    return result


def cmd_h2_request(args):
    import h2.config
    import h2.connection
    import h2.events

    sock = connect(args, ["h2"])
    if sock.selected_alpn_protocol() != "h2":
        return {"error": f"ALPN chose {sock.selected_alpn_protocol()!r}"}
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
    )
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [
            (":method", args.method),
            (":scheme", "https"),
            (":authority", args.host),
            (":path", args.path),
        ],
        end_stream=True,
    )
    sock.sendall(conn.data_to_send())
    result = {"status": None, "body": ""}
    body = b""
    sock.settimeout(10)
    done = False
    while not done:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            result["error"] = "timeout"
            break
        if not data:
            result["error"] = "connection closed"
            break
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived) and ev.stream_id == sid:
                result["status"] = int(dict(ev.headers)[b":status"])
            elif isinstance(ev, h2.events.DataReceived) and ev.stream_id == sid:
                conn.acknowledge_received_data(ev.flow_controlled_length, sid)
                body += ev.data
            elif isinstance(ev, h2.events.StreamEnded) and ev.stream_id == sid:
                done = True
            elif isinstance(ev, h2.events.StreamReset) and ev.stream_id == sid:
                result["reset"] = int(ev.error_code)
                done = True
            elif isinstance(ev, h2.events.ConnectionTerminated):
                result["goaway"] = int(ev.error_code)
                done = True
        sock.sendall(conn.data_to_send())
    result["body"] = body.decode(errors="replace")
    sock.close()
    return result


def cmd_raw_h1(args):
    sock = connect(args, ["http/1.1"])
    sock.sendall(args.data.encode().decode("unicode_escape").encode("latin-1"))
    head = read_until(sock, b"\r\n").decode(errors="replace")
    sock.close()
    return {"status_line": head.split("\r\n", 1)[0]}


def cmd_slowloris(args):
    sock = connect(args, ["http/1.1"])
    request = f"GET / HTTP/1.1\r\nHost: {args.host}\r\nX-Slow: " + "a" * 4096
    start = time.monotonic()
    sent = 0
    how = "still open"
    sock.settimeout(args.interval)
    while time.monotonic() - start < args.give_up:
        try:
            sock.sendall(request[sent % len(request)].encode())
            sent += 1
            data = sock.recv(4096)
            if data == b"":
                how = "closed"
                break
            how = "answered: " + data.split(b"\r\n", 1)[0].decode(errors="replace")
            break
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError, ssl.SSLError) as e:
            how = f"reset ({type(e).__name__})"
            break
    return {"outcome": how, "seconds": round(time.monotonic() - start, 2), "bytes_sent": sent}


def cmd_rapid_reset(args):
    import h2.events
    import h2.exceptions

    sock, conn = h2_connect(args)
    if sock is None:
        return conn
    headers = [
        (":method", "GET"),
        (":scheme", "https"),
        (":authority", args.host),
        (":path", "/"),
    ]
    sent = 0
    goaway = None
    closed = False
    try:
        # Batches of HEADERS immediately followed by RST_STREAM(CANCEL): the server must
        # notice the pattern instead of doing backend work for each stream.
        for _ in range(args.streams // 100):
            for _ in range(100):
                sid = conn.get_next_available_stream_id()
                conn.send_headers(sid, headers, end_stream=True)
                conn.reset_stream(sid, error_code=8)
                sent += 1
            sock.sendall(conn.data_to_send())
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        # The server stopped reading; its GOAWAY may still be in our receive buffer.
        pass
    except h2.exceptions.ProtocolError:
        # The server's GOAWAY already arrived and h2 refuses new streams.
        pass
    sock.settimeout(5)
    deadline = time.monotonic() + 5
    while goaway is None and not closed and time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            break
        except (ConnectionResetError, ssl.SSLError):
            closed = True
            break
        if not data:
            closed = True
            break
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            break
        for ev in events:
            if isinstance(ev, h2.events.ConnectionTerminated):
                goaway = int(ev.error_code)
    return {"streams_sent": sent, "goaway_error_code": goaway, "closed": closed}


def main():
    p = argparse.ArgumentParser()
    p.add_argument(
        "command",
        choices=[
            "httpx",
            "websocket",
            "websocket-h2",
            "slowloris",
            "rapid-reset",
            "h2-request",
            "raw-h1",
        ],
    )
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", required=True)
    p.add_argument("--ca", required=True)
    p.add_argument("--path", default="/")
    p.add_argument("--http2", action="store_true")
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--give-up", type=float, default=60.0)
    p.add_argument("--streams", type=int, default=2000)
    p.add_argument("--method", default="GET")
    p.add_argument("--data", default="")
    args = p.parse_args()
    fn = {
        "httpx": cmd_httpx,
        "websocket": cmd_websocket,
        "websocket-h2": cmd_websocket_h2,
        "slowloris": cmd_slowloris,
        "rapid-reset": cmd_rapid_reset,
        "h2-request": cmd_h2_request,
        "raw-h1": cmd_raw_h1,
    }[args.command]
    print(json.dumps(fn(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
