#!/usr/bin/python3
"""Counts the bytes on the wire of repeated identical POSTs over HTTP/2+TLS and HTTP/1.1+TLS (issue 10).

Usage: measure-wire-bytes.py INGEST_PORT CA_FILE DEVICE_KEY BODY_FILE [COUNTS...]

Runs a counting TCP proxy on a free loopback port in front of the ingest (which must serve TLS for `localhost`) and,
for each protocol and each request count N (default 1 11 21), one `curl` process that sends N identical POSTs of
BODY_FILE to /v1/batches on one connection, with the headers the agent's HTTPClient sends (Authorization, Content-Type,
User-Agent farmgate, no Accept, no Expect). Prints the TCP payload bytes each way (TLS records included; TCP/IP headers
and ACKs not), the steady-state cost per request from the difference between the two largest counts, and the cost of
a TLS handshake alone (`openssl s_client`, which closes right after it, session tickets included).
"""
import os
import socket
import subprocess
import sys
import threading


class CountingProxy:
    def __init__(self, target_port):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.up = 0
        self.down = 0
        self.connections = 0
        self.active = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(("127.0.0.1", self.target_port))
            with self.lock:
                self.connections += 1
            done = threading.Event()
            threads = [
                threading.Thread(target=self.pump, args=(client, server, "up", done), daemon=True),
                threading.Thread(target=self.pump, args=(server, client, "down", done), daemon=True),
            ]
            self.active.extend(threads)
            for thread in threads:
                thread.start()

    def pump(self, source, destination, direction, done):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                with self.lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
                destination.sendall(data)
        except OSError:
            pass
        try:
            destination.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def reset(self):
        for thread in self.active:
            thread.join(timeout=5)
        self.active = []
        with self.lock:
            counts = (self.up, self.down, self.connections)
            self.up = self.down = self.connections = 0
        return counts


def run_curl(proxy, protocol, ca_file, key, body_file, count):
    arguments = ["curl", "-sS", "--noproxy", "*", "--cacert", ca_file]
    for index in range(count):
        if index:
            arguments.append("--next")
        arguments += [
            protocol, "--cacert", ca_file, "-o", "/dev/null", "-w", "%{http_code} %{http_version}\\n",
            "-H", "Authorization: Bearer " + key, "-H", "Content-Type: application/json", "-H", "Accept:", "-H", "Expect:",
            "-A", "farmgate", "--data-binary", "@" + body_file, "https://localhost:%d/v1/batches" % proxy.port,
        ]
    output = subprocess.run(arguments, check=True, capture_output=True, text=True).stdout.split("\n")
    statuses = sorted(set(line for line in output if line))
    return proxy.reset(), statuses


def main():
    port, ca_file, key, body_file = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    counts = [int(value) for value in sys.argv[5:]] or [1, 11, 21]
    proxy = CountingProxy(port)
    print("body: %d bytes" % os.path.getsize(body_file))
    for name, alpn in (("HTTP/2+TLS", "h2"), ("HTTP/1.1+TLS", "http/1.1")):
        subprocess.run(
            ["openssl", "s_client", "-connect", "localhost:%d" % proxy.port, "-servername", "localhost", "-alpn", alpn, "-CAfile", ca_file],
            stdin=subprocess.DEVNULL, capture_output=True, check=False)
        (up, down, _), _ = proxy.reset(), None
        print("%s handshake alone (openssl s_client): up %d, down %d bytes" % (name, up, down))
    for name, protocol in (("HTTP/2+TLS", "--http2"), ("HTTP/1.1+TLS", "--http1.1")):
        results = []
        for count in counts:
            (up, down, connections), statuses = run_curl(proxy, protocol, ca_file, key, body_file, count)
            results.append((count, up, down))
            print("%s %3d requests on %d connection(s) [%s]: up %6d, down %6d bytes" % (name, count, connections, ", ".join(statuses), up, down))
        (n1, up1, down1), (n2, up2, down2) = results[-2], results[-1]
        print("%s steady state per request: up %.1f, down %.1f bytes (body %d)" % (
            name, (up2 - up1) / (n2 - n1), (down2 - down1) / (n2 - n1), os.path.getsize(body_file)))


if __name__ == "__main__":
    main()
