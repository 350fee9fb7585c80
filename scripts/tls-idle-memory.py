#!/usr/bin/env python3
"""Memory per idle TLS keep-alive connection of a running ingestd.

Opens N TLS connections to ingestd's [tls] listener, makes one request on
each (so the handshake is done and the connection is idle between
requests), and prints the growth of ingestd's RSS per connection.

    scripts/tls-idle-memory.py HOST PORT PID CA_PEM [N]      (N default 3000)

HOST:PORT is the https address ingestd prints, PID its process id, CA_PEM
the certificate to trust (the self-signed one in [tls].cert_file, say).
"""
import socket
import ssl
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    raise SystemExit(f"no VmRSS for pid {pid}")


def main():
    host, port, pid, ca = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    n = int(sys.argv[5]) if len(sys.argv) > 5 else 3000
    ctx = ssl.create_default_context(cafile=ca)
    time.sleep(0.5)
    before = rss_kib(pid)
    conns = []
    for _ in range(n):
        tls = ctx.wrap_socket(socket.create_connection((host, port)), server_hostname=host)
        tls.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while b"}" not in data:
            chunk = tls.recv(4096)
            if not chunk:
                raise SystemExit("connection closed before the answer")
            data += chunk
        conns.append(tls)
    time.sleep(1.5)
    after = rss_kib(pid)
    print(f"tls: {n} idle connections: RSS {before} KiB -> {after} KiB: {(after - before) * 1024 // n} bytes per connection")


if __name__ == "__main__":
    main()
