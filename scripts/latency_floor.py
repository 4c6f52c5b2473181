#!/usr/bin/env python3
"""Latency of one publish-to-delivery trip on loopback, measured with the simplest client there is.

`brokerctl bench latency` reports what a brokerd-client user sees. This script asks how much of
that is the machine: it times the same trip with blocking sockets and hand-built frames, and
times a TCP echo (two hops, no broker at all) as the floor. Each probe:

  echo    an echo server in a child process: send 16 bytes, wait for them back
  ping    PING to the broker, wait for PONG (one connection)
  single  PUB of 16 bytes on one connection, wait for the MSG on another; 100 us between trips
  burst   ten PUBs in one write every 1 ms, wait for all ten MSGs (brokerctl's pacing at 10,000/s)

`single` and `burst` wait for each delivery before sending again, so unlike `brokerctl bench`
they never have two trips in flight: a floor probe, not a load test.

    python3 scripts/latency_floor.py --brokerd 127.0.0.1:7654 [--nats 127.0.0.1:4222]

With `--nats`, the same probes also run against a NATS server speaking its text protocol, in
turn with brokerd's, so both see the same moment of the machine. Loopback only; every probe is
bounded by --count trips and a 5 s socket timeout.
"""

import argparse
import multiprocessing
import socket
import statistics
import struct
import time

PAYLOAD = b"x" * 16
TIMEOUT = 5.0


def connect(addr):
    host, port = addr.rsplit(":", 1)
    if host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127."):
        raise SystemExit(f"{addr}: loopback addresses only")
    s = socket.create_connection((host, int(port)), timeout=TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s, n):
    got = bytearray()
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            raise ConnectionError("closed")
        got += chunk
    return bytes(got)


class Brokerd:
    """brokerd's binary protocol (docs/protocol.md), only the frames the probes need."""

    name = "brokerd"

    def __init__(self, addr):
        self.addr = addr

    def session(self):
        s = connect(self.addr)
        name = b"latency-floor"
        # HELLO: req_id 1, version 1, flags 0, overflow 0 (server default), name.
        s.sendall(struct.pack(">IBIHBBH", 11 + len(name), 0x01, 1, 1, 0, 0, len(name)) + name)
        self.expect(s, 0x81)
        return s

    @staticmethod
    def expect(s, kind):
        length, got = struct.unpack(">IB", recv_exactly(s, 5))
        recv_exactly(s, length - 1)
        if got != kind:
            raise RuntimeError(f"expected frame 0x{kind:02x}, got 0x{got:02x}")

    def subscribe(self, s, topic):
        t = topic.encode()
        s.sendall(struct.pack(">IBIIBH", 12 + len(t), 0x03, 2, 1, 0, len(t)) + t)
        self.expect(s, 0x82)

    def publish(self, topic):
        t = topic.encode()
        body = struct.pack(">BH", 0, len(t)) + t + PAYLOAD
        return struct.pack(">IBIB", 6 + len(body), 0x02, 0, 0) + body

    def delivery_len(self, topic):
        # MSG = PUB's body behind a 17-byte head (length, type, sid, sequence).
        return 4 + 13 + 3 + len(topic.encode()) + len(PAYLOAD)

    ping = bytes.fromhex("000000050500000007")
    pong_len = 9


class Nats:
    """The NATS text protocol, for the side-by-side run."""

    name = "nats"

    def __init__(self, addr):
        self.addr = addr

    def session(self):
        s = connect(self.addr)
        line = b""
        while not line.endswith(b"\r\n"):
            line += s.recv(4096)
        s.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nPING\r\n')
        if recv_exactly(s, 6) != b"PONG\r\n":
            raise RuntimeError("no PONG after CONNECT")
        return s

    def subscribe(self, s, topic):
        s.sendall(f"SUB {topic} 1\r\nPING\r\n".encode())
        if recv_exactly(s, 6) != b"PONG\r\n":
            raise RuntimeError("no PONG after SUB")

    def publish(self, topic):
        return f"PUB {topic} {len(PAYLOAD)}\r\n".encode() + PAYLOAD + b"\r\n"

    def delivery_len(self, topic):
        return len(f"MSG {topic} 1 {len(PAYLOAD)}\r\n".encode()) + len(PAYLOAD) + 2

    ping = b"PING\r\n"
    pong_len = 6


def percentiles(samples):
    samples.sort()
    at = lambda q: samples[min(len(samples) - 1, int(len(samples) * q))]
    return at(0.5), at(0.99), at(0.999)


def trips(count, gap, send, wait):
    lat = []
    for _ in range(count):
        t0 = time.perf_counter_ns()
        send()
        wait()
        lat.append((time.perf_counter_ns() - t0) / 1000)
        time.sleep(gap)
    return percentiles(lat)


def echo_server(listener):
    c, _ = listener.accept()
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with c:
        while data := c.recv(4096):
            c.sendall(data)


def probe_echo(count):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    # A process of its own, as a broker would be (a thread would add the interpreter lock's hand-off).
    server = multiprocessing.Process(target=echo_server, args=(listener,), daemon=True)
    server.start()
    with connect(f"127.0.0.1:{listener.getsockname()[1]}") as s:
        result = trips(count, 0.0001, lambda: s.sendall(PAYLOAD), lambda: recv_exactly(s, 16))
    server.join(TIMEOUT)
    listener.close()
    return result


def probe_ping(broker, count):
    with broker.session() as s:
        return trips(count, 0.0001, lambda: s.sendall(broker.ping), lambda: recv_exactly(s, broker.pong_len))


def probe_pubsub(broker, count, per_trip, gap):
    topic = "latency.floor"
    with broker.session() as pub, broker.session() as sub:
        broker.subscribe(sub, topic)
        frames = broker.publish(topic) * per_trip
        want = broker.delivery_len(topic) * per_trip
        return trips(count, gap, lambda: pub.sendall(frames), lambda: recv_exactly(sub, want))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--brokerd", required=True, metavar="HOST:PORT")
    ap.add_argument("--nats", metavar="HOST:PORT")
    ap.add_argument("--count", type=int, default=5000, help="trips per probe (default 5000)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every probe (default 3)")
    args = ap.parse_args()
    brokers = [Brokerd(args.brokerd)] + ([Nats(args.nats)] if args.nats else [])
    count = max(1, min(args.count, 100_000))
    results = {}
    for r in range(max(1, min(args.rounds, 20))):
        runs = [("echo", "-", lambda: probe_echo(count))]
        for b in brokers:
            runs += [
                ("ping", b.name, lambda b=b: probe_ping(b, count)),
                ("single", b.name, lambda b=b: probe_pubsub(b, count, 1, 0.0001)),
                ("burst", b.name, lambda b=b: probe_pubsub(b, count // 10 or 1, 10, 0.001)),
            ]
        for probe, target, run in runs:
            p50, p99, p999 = run()
            results.setdefault((probe, target), []).append(p99)
            print(f"round {r + 1}  {probe:6} {target:8} p50 {p50:7.1f}  p99 {p99:7.1f}  p999 {p999:7.1f} us", flush=True)
    print("median p99 over rounds:")
    for (probe, target), p99s in results.items():
        print(f"  {probe:6} {target:8} {statistics.median(p99s):7.1f} us  ({', '.join(f'{x:.0f}' for x in p99s)})")


if __name__ == "__main__":
    main()
