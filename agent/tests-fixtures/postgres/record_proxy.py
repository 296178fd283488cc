#!/usr/bin/env python3
"""Recording TCP proxy for PostgreSQL wire fixtures.

Sits between a client and a server and writes every chunk each side sent, in the order the
proxy received them, to one text file per accepted connection:

    # free-form comment lines (what was recorded, with which command)
    > 0000000804d2162f        frontend -> backend chunk, hex
    < 4e                      backend -> frontend chunk, hex

One line is one recv() of the proxy, i.e. roughly one send() of the peer. The files depend on
nothing but the bytes the real programs sent; the parser tests replay them as segments.

Usage:
    record_proxy.py --listen 55433 --upstream 127.0.0.1:55432 --out DIR/NAME [--comment TEXT]
writes DIR/NAME-1.hex, DIR/NAME-2.hex, ... (one per client connection) until killed.
"""

import argparse
import itertools
import selectors
import socket
import threading


def relay(client: socket.socket, upstream: tuple[str, int], path: str, comment: str) -> None:
    server = socket.create_connection(upstream)
    lock = threading.Lock()
    with open(path, "w", encoding="ascii") as out:
        for line in comment.splitlines():
            out.write(f"# {line}\n")
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ, (">", server))
        sel.register(server, selectors.EVENT_READ, ("<", client))
        open_sides = 2
        while open_sides:
            for key, _ in sel.select():
                marker, peer = key.data
                src = key.fileobj
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(src)
                    open_sides -= 1
                    try:
                        peer.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    continue
                with lock:
                    out.write(f"{marker} {data.hex()}\n")
                    out.flush()
                peer.sendall(data)
    client.close()
    server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="host:port of the real server")
    ap.add_argument("--out", required=True, help="output path prefix")
    ap.add_argument("--comment", default="")
    args = ap.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    upstream = (host, int(port))

    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", args.listen))
    ls.listen(16)
    for n in itertools.count(1):
        client, _ = ls.accept()
        path = f"{args.out}-{n}.hex"
        threading.Thread(target=relay, args=(client, upstream, path, args.comment), daemon=True).start()


if __name__ == "__main__":
    main()
