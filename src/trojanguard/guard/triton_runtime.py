"""Run a Triton Inference Server on this machine, on loopback, for a model repository written by
:func:`~trojanguard.guard.write_triton_repository` — the tests', the benchmark's and a developer's server.

The server binary is found (:func:`find_server_home`) in ``$TROJANGUARD_TRITONSERVER`` (a folder holding
``bin/tritonserver``), an installed ``nvidia-pytriton`` package, ``<prefix>/tritonserver`` (where ``make`` unpacks
the ``nvidia-pytriton`` wheel: :func:`unpack_server_wheel`) or ``/opt/tritonserver`` (NVIDIA's container). The
wheel's server has Triton's Python backend only (no ONNX Runtime backend): serve its repositories with
``backend="python"``. Its Python backend needs (a) a backend folder holding ``backends/python/*`` and the stub
built for this Python (``python_backend_stubs/<X.Y>/``), assembled here in a temporary folder, and (b) the wheel's
bundled libraries on ``LD_LIBRARY_PATH``.

Usage::

    with LocalTritonServer("repo") as server:
        client = tritonclient.http.InferenceServerClient(server.url)

The server runs in its own process group; :meth:`LocalTritonServer.stop` (also on an exception inside the
``with`` block) ends the group and waits until the port is free.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Self

ENV_VARIABLE = "TROJANGUARD_TRITONSERVER"
PYTRITON_WHEEL = "nvidia-pytriton==0.7.0"  # the wheel make unpacks (Makefile); its server has the Python backend
SERVER = Path("bin") / "tritonserver"


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through HTTP_PROXY


class TritonServerError(RuntimeError):
    """The server could not be found, did not start, or did not become ready (the message holds its log's tail)."""


def find_server_home() -> Path | None:
    """The folder holding ``bin/tritonserver`` (see the module docstring for the search order), or None."""
    candidates = []
    if os.environ.get(ENV_VARIABLE):
        candidates.append(Path(os.environ[ENV_VARIABLE]))
    import importlib.util

    spec = importlib.util.find_spec("pytriton")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "tritonserver" for p in spec.submodule_search_locations]
    candidates += [Path(sys.prefix) / "tritonserver" / "pytriton" / "tritonserver", Path("/opt/tritonserver")]
    for home in candidates:
        if (home / SERVER).is_file() and os.access(home / SERVER, os.X_OK):
            return home
    return None


def python_stub(home: Path) -> Path | None:
    """The Python-backend stub built for this interpreter's version, if the server ships one."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    for stub in (home / "python_backend_stubs" / version / "triton_python_backend_stub",
                 home / "backends" / "python" / "triton_python_backend_stub"):
        if stub.is_file():
            return stub
    return None


def unavailable_reason() -> str | None:
    """Why no local server with a Python backend for this interpreter can run here, or None when one can."""
    home = find_server_home()
    if home is None:
        return (f"no tritonserver found (set {ENV_VARIABLE}, or run make, which unpacks the {PYTRITON_WHEEL} wheel "
                f"into {Path(sys.prefix) / 'tritonserver'})")
    if not (home / "backends" / "python").is_dir():
        return f"{home}: no Python backend (backends/python)"
    if python_stub(home) is None:
        return f"{home}: no Python-backend stub for Python {sys.version_info.major}.{sys.version_info.minor}"
    return None


def probe_failure(timeout: float = 60.0) -> str | None:
    """Why a local server cannot serve a Python-backend ONNX model here, or None when it can: starts one on a
    one-node identity graph (the binary, the stub's libpython, NumPy and ONNX Runtime in the embedded
    interpreter). The tests skip on a reason, so a machine without what the binary needs is not a failure."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    import onnx
    from onnx import TensorProto, helper

    from trojanguard.guard.triton_server import _python_path, _write_onnx_model

    with tempfile.TemporaryDirectory(prefix="trojanguard-probe-") as folder:
        folder = Path(folder)
        tensor = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 1]) for n in ("input", "output")]
        graph = helper.make_model(helper.make_graph([helper.make_node("Identity", ["input"], ["output"])], "probe",
                                                    tensor[:1], tensor[1:]), opset_imports=[helper.make_opsetid("", 13)])
        onnx.save(graph, str(folder / "probe.onnx"))
        batching = {"max_batch_size": 4, "max_queue_delay_microseconds": 0, "preferred_batch_sizes": None,
                    "instance_kind": "cpu", "instance_count": 1, "backend": "python"}
        python = {"python_path": _python_path("auto"), "intra_op_threads": "1", "pixel_cutoff": ""}
        _write_onnx_model(folder / "repo", "probe", 1, folder / "probe.onnx", graph, batching, python)
        try:
            with LocalTritonServer(folder / "repo", startup_timeout=timeout):
                return None
        except TritonServerError as exc:
            return f"the local tritonserver cannot serve a Python-backend model here: {' '.join(str(exc).split())[-400:]}"


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_is_free(port: int) -> bool:
    """A server could listen on the loopback ``port`` now (bound with SO_REUSEADDR, as servers bind: the closed
    connections a stopped server leaves in TIME_WAIT do not hold the port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class LocalTritonServer:
    """``tritonserver`` serving ``repository`` over HTTP on ``127.0.0.1:http_port`` (gRPC and metrics off).

    Args:
        repository: a model repository (every model in it is loaded at start).
        http_port: the port (None: a free one).
        home: the server's folder (None: :func:`find_server_home`).
        startup_timeout: seconds to wait for readiness before giving up (and stopping the server).
        log_path: where the server's output goes (None: a file in the temporary backend folder, removed on stop).
            The server's process group is also ended when this Python process exits without :meth:`stop`.
    """

    def __init__(self, repository: str | Path, *, http_port: int | None = None, home: str | Path | None = None,
                 startup_timeout: float = 60.0, log_path: str | Path | None = None):
        self.repository = Path(repository)
        if not self.repository.is_dir():
            raise FileNotFoundError(f"repository: no folder at {self.repository}")
        reason = unavailable_reason() if home is None else None
        if reason is not None:
            raise TritonServerError(reason)
        self.home = Path(home) if home is not None else find_server_home()
        self.http_port = http_port or free_port()
        self.startup_timeout = startup_timeout
        self.log_path = None if log_path is None else Path(log_path)
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    @property
    def url(self) -> str:
        """``host:port`` as tritonclient's HTTP client takes it."""
        return f"127.0.0.1:{self.http_port}"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> LocalTritonServer:
        """Start the server and wait until it reports ready; a failed start stops it and raises TritonServerError."""
        if self.process is not None:
            return self
        if not port_is_free(self.http_port):  # else readiness could be another server's answer
            raise TritonServerError(f"http_port: expected a free port, got {self.http_port}, which is in use")
        self._workdir = Path(tempfile.mkdtemp(prefix="trojanguard-triton-"))
        try:
            backends = self._workdir / "backends"
            shutil.copytree(self.home / "backends", backends, symlinks=True)
            stub = python_stub(self.home)
            if stub is not None and stub.parent != self.home / "backends" / "python":
                shutil.copy2(stub, backends / "python" / stub.name)
            self._log = self.log_path or self._workdir / "server.log"
            env = dict(os.environ)
            libraries = [str(p) for p in (self.home.parent.parent / "nvidia_pytriton.libs", self.home / "lib")
                         if p.is_dir()]
            env["LD_LIBRARY_PATH"] = os.pathsep.join([*libraries, env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
            command = [str(self.home / SERVER), "--model-repository", str(self.repository.resolve()),
                       "--backend-directory", str(backends), "--http-port", str(self.http_port),
                       "--http-address", "127.0.0.1", "--allow-grpc", "false", "--allow-metrics", "false",
                       "--exit-timeout-secs", "3", "--strict-readiness", "true"]
            with open(self._log, "wb") as log:
                self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                start_new_session=True)
        except OSError as exc:
            self.stop()
            raise TritonServerError(f"tritonserver could not be started: {exc}") from None
        atexit.register(self.stop)  # a Python process that ends without stop() still ends its server
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonServerError(f"tritonserver exited with code {self.process.returncode} before it was "
                                        f"ready; its log ends:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.1)
        raise TritonServerError(f"tritonserver not ready after {self.startup_timeout:g} s; its log ends:\n"
                                f"{self.log_tail()}")

    def ready(self) -> bool:
        """The server answers ``/v2/health/ready`` with 200 (every model loaded)."""
        try:
            with _NO_PROXY.open(f"http://{self.url}/v2/health/ready", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's output."""
        try:
            text = Path(self._log).read_text(encoding="utf-8", errors="replace")
        except (AttributeError, OSError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 15.0) -> None:
        """End the server's process group (SIGTERM, then SIGKILL after ``timeout``) and wait until its port is
        free; idempotent."""
        process, self.process = self.process, None
        atexit.unregister(self.stop)
        if process is not None:
            for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:  # the Python-backend stubs are in the group too: make sure none outlives the server
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while not port_is_free(self.http_port) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self._workdir is not None:  # the backend copy and, unless log_path was given, the log
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def unpack_server_wheel(wheel: str | Path, destination: str | Path) -> Path:
    """Unpack an ``nvidia-pytriton`` wheel's server (not its Python package's dependencies: the wheel is a zip)
    into ``destination``, keeping the executable bits zipfile drops; return the server's home folder."""
    destination = Path(destination)
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            if not member.filename.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
                continue
            path = Path(archive.extract(member, destination))
            mode = member.external_attr >> 16
            if mode & 0o111:
                path.chmod(path.stat().st_mode | 0o755)
    home = destination / "pytriton" / "tritonserver"
    if not (home / SERVER).is_file():
        raise TritonServerError(f"wheel: {wheel} holds no pytriton/tritonserver/{SERVER}")
    return home


def main(argv: list[str] | None = None) -> int:
    """``python -m trojanguard.guard.triton_runtime unpack WHEEL DESTINATION`` (used by the Makefile)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "unpack":
        print("usage: python -m trojanguard.guard.triton_runtime unpack WHEEL DESTINATION", file=sys.stderr)
        return 2
    home = unpack_server_wheel(argv[1], argv[2])
    print(f"tritonserver: {home / SERVER}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
