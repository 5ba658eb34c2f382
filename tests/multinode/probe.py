"""What a process on an emulated host sees; run there by tests/multinode (`hosts.sh exec HOST python probe.py`).

    probe.py look NAME...          -> JSON: hostname, getfqdn, each NAME's IPv4 addresses, interfaces
    probe.py serve PORT            -> accept one connection on PORT, print the peer's address, exit
    probe.py connect HOST PORT S   -> JSON: "ok", or the error of connecting within S seconds
"""

from __future__ import annotations

import json
import socket
import sys


def look(names: list[str]) -> dict:
    resolved: dict[str, list[str] | str] = {}
    for name in names:
        try:
            resolved[name] = sorted({a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)})
        except OSError as exc:
            resolved[name] = f"{type(exc).__name__}: {exc}"
    return {"hostname": socket.gethostname(), "fqdn": socket.getfqdn(), "resolved": resolved,
            "interfaces": sorted(name for _, name in socket.if_nameindex())}


def serve(port: int) -> None:
    with socket.create_server(("0.0.0.0", port)) as s:
        print("listening", flush=True)
        conn, peer = s.accept()
        conn.close()
        print(json.dumps({"peer": peer[0]}), flush=True)


def connect(host: str, port: int, timeout: float) -> dict:
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return {"result": "ok"}
    except OSError as exc:
        return {"result": type(exc).__name__, "errno": exc.errno, "message": str(exc)}


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "look":
        print(json.dumps(look(args)))
    elif cmd == "serve":
        serve(int(args[0]))
    elif cmd == "connect":
        print(json.dumps(connect(args[0], int(args[1]), float(args[2]))))
    else:
        raise SystemExit(f"unknown command {cmd!r}")
