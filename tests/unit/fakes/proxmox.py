"""A fake Proxmox VE API (HTTPS, API-token auth) that records every request: enough of
/api2/json for llamavm's VM creation — storage, qemu create/config/resize/start, task status."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A CA-less self-signed certificate for 127.0.0.1 (cert, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-pve")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "pve.pem", folder / "pve.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class FakeProxmox:
    def __init__(self, folder: Path, token: str, node: str = "pve-1") -> None:
        self.token, self.node = token, node
        self.requests: list[tuple[str, str, dict[str, Any]]] = []
        self.vms: dict[int, dict[str, Any]] = {}
        self.running: set[int] = set()
        self.storage = {"local": "iso,vztmpl,backup,snippets,import", "local-lvm": "images,rootdir"}
        self.fail_task: str | None = None  # a path whose task ends in an error
        self.cert, key = self_signed(folder)
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, data: Any) -> None:
                body = json.dumps({"data": data} if status < 400 else {"errors": data}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self, method: str) -> None:
                url = urllib.parse.urlsplit(self.path)
                params = dict(urllib.parse.parse_qsl(url.query))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    raw = self.rfile.read(length).decode()
                    if "json" in (self.headers.get("Content-Type") or ""):
                        params.update(json.loads(raw))
                    else:
                        params.update(urllib.parse.parse_qsl(raw))
                path = url.path.removeprefix("/api2/json/")
                auth = self.headers.get("Authorization", "")
                if auth != f"PVEAPIToken={fake.token}":
                    self._answer(401, {"auth": "authentication failure"})
                    return
                fake.requests.append((method, path, params))
                status, data = fake.route(method, path, params)
                self._answer(status, data)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_PUT(self) -> None:
                self._handle("PUT")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _task(self, what: str) -> str:
        return f"UPID:{self.node}:0000ABCD:00000001:00000000:{what}:llamavm@pve!llamavm:"

    def route(self, method: str, path: str, params: dict[str, Any]) -> tuple[int, Any]:
        parts = path.split("/")
        if method == "GET" and parts[0] == "storage" and len(parts) == 2:
            if parts[1] not in self.storage:
                return 500, {"storage": f"storage '{parts[1]}' does not exist"}
            return 200, {"storage": parts[1], "content": self.storage[parts[1]]}
        if parts[:3] == ["nodes", self.node, "tasks"] and parts[-1] == "status":
            upid = urllib.parse.unquote(parts[3])
            failed = self.fail_task is not None and self.fail_task in upid
            return 200, {"status": "stopped", "exitstatus": "command failed" if failed else "OK"}
        if parts[:3] != ["nodes", self.node, "qemu"]:
            return 501, {"path": f"not in the fake: {path}"}
        if method == "POST" and len(parts) == 3:
            vmid = int(params["vmid"])
            if vmid in self.vms:
                return 500, {"vmid": f"VM {vmid} already exists"}
            self.vms[vmid] = dict(params)
            return 200, self._task("qmcreate")
        vmid = int(parts[3])
        if vmid not in self.vms:
            conf = f"nodes/{self.node}/qemu-server/{vmid}.conf"
            return 500, f"Configuration file '{conf}' does not exist"
        rest = "/".join(parts[4:])
        if method == "GET" and rest == "config":
            return 200, self.vms[vmid]
        if method == "PUT" and rest == "config":
            self.vms[vmid].update(params)
            return 200, None
        if method == "PUT" and rest == "resize":
            self.vms[vmid]["size"] = params["size"]
            return 200, self._task("resize")
        if method == "POST" and rest == "status/start":
            self.running.add(vmid)
            return 200, self._task("qmstart")
        return 501, {"path": f"not in the fake: {path}"}
