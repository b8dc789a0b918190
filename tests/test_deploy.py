"""The edge's container image and Kubernetes manifests (deploy/), proven without a registry or a container engine.

``scripts/build-image`` builds the image (mmdebstrap, umoci) once per session, cached by what goes into it. The
test unpacks it with umoci and runs its entrypoint from its own root filesystem as a container runtime would
(``unshare``: mount and PID namespaces; ``chroot``; the image's user, no new privileges), with the Mender
stand-in and PostgreSQL on this host, and Debian's real Mender client with a stamped image's credentials
accepted through the image's nginx and edge serve:

- as deploy/kubernetes/deployment.yaml runs it: read-only root, an emptyDir (tmpfs) at each of its emptyDir
  paths, each Secret volume a read-only directory of 0440 files given to fsGroup, the Deployment's user,
  environment and arguments; readiness and liveness asked where its probes ask;
- as mtls-ambassador's documentation runs its own image, with this image's name in its place: its environment
  (the password in it), its three files mounted, a writable container layer and nothing else.

The manifests are checked against Kubernetes' OpenAPI schemas (kubernetes-validate, offline), and against
the image: ports, probes, paths and user are the ones the entrypoint and the image's config use.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from imageprov.disk.golden import Scheme
from imageprov.edge.nginx import HEALTH_ROUTES
from tests import test_edge_e2e
from tests.conftest import IN_CI, imageprov_pki, need
from tests.edge_support import PASSWORD, USER, get, running_standin, wait_for
from tests.pg import running_postgres
from tests.test_edge_e2e import _bootstrap, _client_root

# The end-to-end tests' fixture that runs the Mender client with an identity script of its own.
identity_runner = test_edge_e2e.identity_runner

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
MANIFESTS = DEPLOY / "kubernetes"
BUILD_IMAGE = REPO / "scripts" / "build-image"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imageprov" / "edge-image"
TAG = "test"
KEEP = 3  # cached images kept (each about 90 MB)
# In the cluster, the Mender server is the API gateway's in-cluster name; here, the stand-in on loopback.
UPSTREAM_ENV = "UPSTREAM_SERVER_URL"
PG_IN_CONTAINER = "/run/postgresql"  # where the test's PostgreSQL socket is bound (in the cluster: TCP)


def _entrypoint() -> ModuleType:
    """deploy/entrypoint.py as a module: its paths and ports are what the manifests must use."""
    spec = importlib.util.spec_from_file_location("imageprov_edge_entrypoint", DEPLOY / "entrypoint.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ENTRY = _entrypoint()


def _need_root(why: str) -> None:
    if os.geteuid() != 0:
        message = f"needs root: {why}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def _manifests() -> dict[str, dict[str, Any]]:
    """Every object in deploy/kubernetes/, by kind."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                assert document["kind"] not in found, f"two {document['kind']} objects"
                found[document["kind"]] = document
    return found


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, "nginx and edge serve share one container"
    container: dict[str, Any] = containers[0]
    return container


# -- the image: built once, cached by its inputs --------------------------------------------------------


@dataclass(frozen=True)
class Image:
    layout: Path
    config: dict[str, Any]  # the OCI image config's "config": User, Entrypoint, Env, ExposedPorts
    rootfs: Path  # unpacked by umoci, for this session

    @property
    def uid_gid(self) -> tuple[int, int]:
        uid, _, gid = str(self.config["User"]).partition(":")
        return int(uid), int(gid)

    @property
    def env(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.config.get("Env") or [])


def _wheel_digest(wheel: Path) -> str:
    """The wheel's content, not its zip's timestamps: the same sources give the same key."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(wheel) as archive:
        for name in sorted(archive.namelist()):
            digest.update(name.encode() + b"\0" + hashlib.sha256(archive.read(name)).digest())
    return digest.hexdigest()


def _inputs_digest(wheel: Path) -> str:
    """What the image is made of: imageprov's wheel, the entrypoint, the root filesystem's hook, the build script.
    (Not the manifests nor the README: they change no byte of the image.)"""
    digest = hashlib.sha256(_wheel_digest(wheel).encode())
    for path in sorted(
        [BUILD_IMAGE, DEPLOY / "entrypoint.py", *(p for p in (DEPLOY / "image").rglob("*") if p.is_file())]
    ):
        mode = "x" if os.access(path, os.X_OK) else "-"
        digest.update(f"{path.relative_to(REPO)}\0{mode}\0".encode() + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:24]


def _build_wheel(out: Path) -> Path:
    """imageprov's wheel from a copy of the checkout (setuptools writes build/ beside what it builds)."""
    source = out / "src"
    source.mkdir(parents=True)
    shutil.copy2(REPO / "pyproject.toml", source)
    shutil.copy2(REPO / "README.md", source)
    shutil.copytree(REPO / "imageprov", source / "imageprov", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
         "--wheel-dir", str(out), str(source)],
        capture_output=True, text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = out.glob("imageprov-*.whl")
    return wheel


def _image_config(layout: Path) -> dict[str, Any]:
    """The image config of layout:TAG, read from the OCI blobs themselves."""

    def blob(digest: str) -> Any:
        algorithm, _, value = digest.partition(":")
        return json.loads((layout / "blobs" / algorithm / value).read_text())

    index = json.loads((layout / "index.json").read_text())
    (manifest,) = [m for m in index["manifests"] if m["annotations"]["org.opencontainers.image.ref.name"] == TAG]
    config: dict[str, Any] = blob(blob(manifest["digest"])["config"]["digest"])["config"]
    return config


def _prune(keep: str) -> None:
    entries = sorted((p for p in CACHE.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in [p for p in entries if p.name != keep][KEEP - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    """The image scripts/build-image makes of this checkout, unpacked for this session."""
    _need_root("mmdebstrap builds the image's root filesystem with chroot")
    need("mmdebstrap", "umoci", "unshare", "mount")
    work = tmp_path_factory.mktemp("image")
    wheel = _build_wheel(work / "wheel")
    key = _inputs_digest(wheel)
    CACHE.mkdir(parents=True, exist_ok=True)
    layout = CACHE / key / "oci"
    # One build at a time (pytest-xdist's workers, another session): the second finds it built.
    with open(CACHE / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (layout / "index.json").is_file():
            started = time.monotonic()
            proc = subprocess.run(
                [str(BUILD_IMAGE), "--out", str(layout), "--tag", TAG, "--wheel", str(wheel),
                 "--python", sys.executable],
                capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd=REPO,
            )  # fmt: skip
            assert proc.returncode == 0, f"scripts/build-image failed:\n{proc.stderr[-6000:]}"
            print(f"built the edge image in {time.monotonic() - started:.0f} s")
        os.utime(CACHE / key)
        _prune(key)
    rootfs = work / "rootfs"
    subprocess.run(["umoci", "raw", "unpack", "--image", f"{layout}:{TAG}", str(rootfs)], check=True,
                   capture_output=True)  # fmt: skip
    yield Image(layout, _image_config(layout), rootfs)
    shutil.rmtree(rootfs, ignore_errors=True)  # 300 MB, in each of the last sessions pytest keeps


# -- a container runtime, of the few parts these tests need --------------------------------------------

# Run as root in new mount and PID namespaces (unshare): mount the image's root filesystem and the volumes, as
# runc does, then chroot, become the container's user with no new privileges, and exec its entrypoint, as
# PID 1 of the namespace. Argument: a JSON file saying what to mount and run.
_SETUP = r"""
import ctypes, json, os, subprocess, sys

spec = json.load(open(sys.argv[1]))
root = spec["mountpoint"]

def mount(*args):
    subprocess.run(["mount", *args], check=True)

def inside(path):
    return root + path

if spec["layer"]:
    # A writable container layer over the image, as Docker and Kubernetes give by default.
    layer = spec["layer"]
    mount("-t", "tmpfs", "-o", "mode=0755", "tmpfs", layer)
    os.mkdir(layer + "/upper")
    os.mkdir(layer + "/work")
    mount("-t", "overlay", "overlay", "-o",
          f"lowerdir={spec['rootfs']},upperdir={layer}/upper,workdir={layer}/work", root)
else:
    mount("--bind", spec["rootfs"], root)
# Mount targets the image lacks are made before the root turns read-only, as runc makes them.
for m in spec["mounts"]:
    target = inside(m["target"])
    if not os.path.lexists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if m["file"]:
            open(target, "a").close()
        else:
            os.mkdir(target)
if not spec["layer"]:
    mount("-o", "remount,bind,ro", root)
mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", inside("/proc"))
mount("-t", "tmpfs", "-o", "mode=0755,nosuid", "tmpfs", inside("/dev"))
for node in ("null", "zero", "full", "random", "urandom", "tty"):
    open(inside("/dev/" + node), "a").close()
    mount("--bind", "/dev/" + node, inside("/dev/" + node))
for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2")):
    os.symlink(target, inside("/dev/" + name))
os.mkdir(inside("/dev/shm"))
mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev,size=64m", "shm", inside("/dev/shm"))
for m in spec["mounts"]:
    target = inside(m["target"])
    if m["kind"] == "tmpfs":
        mount("-t", "tmpfs", "-o", m["options"], "tmpfs", target)
    else:
        mount("--bind", m["source"], target)
        if m["read_only"]:
            mount("-o", "remount,bind,ro", target)
os.chroot(root)
os.chdir("/")
os.setgroups(spec["groups"])
os.setgid(spec["gid"])
os.setuid(spec["uid"])
PR_SET_NO_NEW_PRIVS = 38
assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0
os.execve(spec["argv"][0], spec["argv"], spec["env"])
"""


@dataclass(frozen=True)
class Mount:
    target: str  # the path in the container
    kind: str  # "bind" or "tmpfs"
    source: Path | None = None
    read_only: bool = True
    options: str = ""  # tmpfs's
    file: bool = False  # a bind-mounted file, not a directory


@dataclass
class Running:
    """A started container: its PID 1 (as this host numbers it) and its output."""

    proc: subprocess.Popen[bytes]
    log: Path
    pid: int = 0
    exit_code: int | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def processes(self) -> list[int]:
        """Every process in the container's PID namespace."""
        namespace = os.readlink(f"/proc/{self.pid}/ns/pid")
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/ns/pid") == namespace:
                        found.append(int(entry))
        return found


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    found.append(int(entry))
    return found


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class Run:
    """How a runtime is told to run the image: its command, environment, user, volumes."""

    argv: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    groups: list[int]  # supplementary: fsGroup
    mounts: list[Mount]
    writable_root: bool  # a container layer (Docker's default); else the root is read-only
    ports: tuple[int, ...]  # what it listens on, in this host's network


@contextlib.contextmanager
def container(image: Image, tmp_path: Path, run: Run) -> Iterator[Running]:
    """The image's entrypoint running from its root filesystem; stopped with SIGTERM after, which it must
    take as a runtime's stop: exit 0 within Kubernetes' grace period."""
    need("unshare", "mount", "chroot")
    work = tmp_path / f"container-{len(list(tmp_path.glob('container-*')))}"
    work.mkdir()
    (work / "root").mkdir()
    if run.writable_root:
        (work / "layer").mkdir()
    spec = {
        "rootfs": str(image.rootfs), "mountpoint": str(work / "root"),
        "layer": str(work / "layer") if run.writable_root else None,
        "mounts": [{"target": m.target, "kind": m.kind, "source": str(m.source) if m.source else None,
                    "read_only": m.read_only, "options": m.options, "file": m.file} for m in run.mounts],
        "uid": run.uid, "gid": run.gid, "groups": run.groups, "argv": run.argv, "env": run.env,
    }  # fmt: skip
    (work / "spec.json").write_text(json.dumps(spec))
    log = work / "output.log"
    # The image listens on fixed ports (8080, 8081) in this host's network: one container at a time.
    with open(CACHE / "ports.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        busy = [port for port in run.ports if not _port_free(port)]
        assert not busy, f"ports {busy} are taken by another program: the image's ports are fixed"
        with open(log, "wb") as output:
            proc = subprocess.Popen(
                ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private",
                 sys.executable, "-c", _SETUP, str(work / "spec.json")],
                stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
            )  # fmt: skip
        running = Running(proc, log)
        try:

            def started() -> bool:
                children = _children(proc.pid)
                running.pid = children[0] if children else 0
                return bool(children) or proc.poll() is not None  # ended already: the test looks at why

            wait_for(started, "the container's PID 1")
            yield running
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(running.pid, signal.SIGTERM)
                try:
                    running.exit_code = proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            else:
                running.exit_code = proc.returncode


def _wait_ready(running: Running, health_port: int) -> None:
    """As the readiness probe: GET /healthz on the health port until 200."""

    def ready() -> bool:
        if running.proc.poll() is not None:
            raise AssertionError(f"the container ended ({running.proc.returncode}):\n{running.output()[-4000:]}")
        try:
            return get(f"http://127.0.0.1:{health_port}/healthz", timeout=2)[0] == 200
        except OSError:
            return False

    wait_for(ready, "the container to be ready (/healthz)", timeout=90)


def _log_lines(running: Running) -> list[dict[str, Any]]:
    """The JSON lines of the container's output (nginx's own lines are not JSON)."""
    lines = []
    for line in running.output().splitlines():
        with contextlib.suppress(ValueError):
            value = json.loads(line)
            if isinstance(value, dict):
                lines.append(value)
    return lines


def _statuses(standin: Any) -> dict[str, str]:
    """Each device the stand-in Mender server knows, by the MAC address its identity script gave."""
    return {json.loads(identity)["mac"]: status for identity, status in standin.statuses().items()}


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def _assert_confined(running: Running, uid: int, secret: str | None = None) -> None:
    """Every process of the container runs as ``uid`` with no capability and no new privileges, and none
    holds ``secret`` in its command line or environment."""
    pids = running.processes()
    names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids}
    assert "nginx" in names and any(n.startswith("python") for n in names), names
    for pid in pids:
        status = _status(pid)
        assert status["Uid"].split() == [str(uid)] * 4, (pid, status["Name"], status["Uid"])
        assert int(status["CapEff"], 16) == 0 and status["NoNewPrivs"].strip() == "1", (pid, status["Name"])
        if secret is not None:
            for what in ("cmdline", "environ"):
                assert secret.encode() not in Path(f"/proc/{pid}/{what}").read_bytes(), (pid, status["Name"], what)


# -- the manifests ---------------------------------------------------------------------------------------


def test_manifests_are_valid_kubernetes_objects() -> None:
    """Strict validation against Kubernetes' OpenAPI schemas (bundled with kubernetes-validate: no network), for
    the oldest and the newest version it has: an unknown field or a wrong type is an error."""
    try:
        import kubernetes_validate
    except ImportError:
        message = "kubernetes-validate is not installed (pip install kubernetes-validate)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    objects = _manifests()
    assert set(objects) == {"Deployment", "Service", "PodDisruptionBudget"}
    for version in ("1.25.0", kubernetes_validate.latest_version()):
        for kind, document in objects.items():
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{kind} is not valid for Kubernetes {version}: {exc}") from None
    # The validator does find what these manifests must not hold.
    broken = json.loads(json.dumps(objects["Deployment"]))
    _container(broken)["securityContext"]["readOnlyRootFilesystm"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.25.0", strict=True)


def test_manifests_run_the_image_as_its_entrypoint_expects(image: Image) -> None:
    """Ports, probes, volume paths and user in the manifests are the ones the image and its entrypoint use; the
    upstream is Mender's in-cluster API gateway; the Service passes TCP through to nginx."""
    objects = _manifests()
    deployment, service, budget = objects["Deployment"], objects["Service"], objects["PodDisruptionBudget"]
    pod = deployment["spec"]["template"]["spec"]
    edge = _container(deployment)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/part-of"] == "mender"
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     budget["spec"]["selector"]["matchLabels"]):  # fmt: skip
        assert selector.items() <= labels.items()
    assert deployment["spec"]["replicas"] >= 2 and budget["spec"]["minAvailable"] >= 1

    # Ports: TLS and the probes where the entrypoint listens and the image exposes.
    ports = {p["name"]: p["containerPort"] for p in edge["ports"]}
    tls_port, health_port = int(ENTRY.LISTEN.rpartition(":")[2]), int(ENTRY.HEALTH_LISTEN.rpartition(":")[2])
    assert ports == {"mtls": tls_port, "health": health_port} == {"mtls": 8080, "health": 8081}
    assert set(image.config["ExposedPorts"]) == {f"{tls_port}/tcp", f"{health_port}/tcp"}
    assert service["spec"]["type"] == "LoadBalancer"
    assert [(p["port"], p["targetPort"], p["protocol"]) for p in service["spec"]["ports"]] == [(443, "mtls", "TCP")]
    assert "health" not in {p["targetPort"] for p in service["spec"]["ports"]}, "probes stay inside the cluster"

    # Probes: edge serve's readiness and liveness, on the health listener.
    readiness, liveness = edge["readinessProbe"]["httpGet"], edge["livenessProbe"]["httpGet"]
    assert (readiness["path"], readiness["port"]) == ("/healthz", "health")
    assert (liveness["path"], liveness["port"]) == ("/livez", "health")
    assert {readiness["path"], liveness["path"]} == set(HEALTH_ROUTES)

    # Volumes: a Secret where the entrypoint reads one; an emptyDir at each path it writes.
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in edge["volumeMounts"]}
    secrets = {path for path, volume in mounts.items() if "secret" in volume}
    assert secrets == {str(ENTRY.PKI), str(ENTRY.SERVER), str(ENTRY.MENDER), str(ENTRY.REGISTRY)}
    assert {path for path, volume in mounts.items() if "emptyDir" in volume} == {str(p) for p in ENTRY.WRITABLE}
    assert all(m.get("readOnly") for m in edge["volumeMounts"] if m["mountPath"] in secrets)
    tls = mounts[str(ENTRY.SERVER)]["secret"]["items"]
    assert {i["key"]: i["path"] for i in tls} == {"tls.crt": ENTRY.SERVER_CERT, "tls.key": ENTRY.SERVER_KEY}
    for path in (*secrets, *(str(p) for p in ENTRY.WRITABLE)):
        assert (image.rootfs / path.lstrip("/")).is_dir(), f"the image has no mount target {path}"

    # The user: the image's, never root, on a read-only root.
    uid, gid = image.uid_gid
    assert uid != 0 and (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    assert pod["securityContext"]["runAsNonRoot"] is True
    context = edge["securityContext"]
    assert context["readOnlyRootFilesystem"] is True and context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert pod["terminationGracePeriodSeconds"] > ENTRY.GRACE

    # The upstream: mender-helm's API gateway Service (api_gateway.service.name, port 80), by its full name.
    env = {e["name"]: e["value"] for e in edge["env"]}
    assert env[UPSTREAM_ENV] == "http://mender-api-gateway.mender.svc.cluster.local"

    # The image runs this checkout's entrypoint.
    assert image.config["Entrypoint"] == ["/usr/local/bin/imageprov-edge-entrypoint"] and not image.config.get("Cmd")
    shipped = image.rootfs / "usr/local/bin/imageprov-edge-entrypoint"
    assert shipped.read_bytes() == (DEPLOY / "entrypoint.py").read_bytes()


# -- running the image -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fleet:
    pki: Path
    images: Path  # stamped images: good-1.sdimg, rev-1.sdimg
    server: Path  # the edge's server certificate: server-cert.pem, server-private.key


def _fleet(tmp_path: Path, make_golden: Any, pki: Path) -> Fleet:
    """Two stamped devices (rev-1 revoked) trusting the edge through their image, and the edge's certificate."""
    golden = make_golden(Scheme.MBR)
    images, server, ca = tmp_path / "stamped", tmp_path / "edge-cert", pki / "ca-cert.pem"
    imageprov_pki("stamp", golden, "--pki", pki, "--out", images, "--device-id", "good-1", "--device-id", "rev-1",
                  "--server-ca", ca)  # fmt: skip
    imageprov_pki("server-cert", "--pki", pki, "--host", "localhost", "--ip", "127.0.0.1", "--out", server)
    imageprov_pki("revoke", "--pki", pki, "rev-1", "--reason", "key-compromise")
    return Fleet(pki, images, server)


def _secret_volume(directory: Path, volume: dict[str, Any], data: dict[str, bytes], fs_group: int) -> Path:
    """A Secret volume as the kubelet lays it out: its items (else every key) as files of defaultMode, given
    to fsGroup."""
    secret = volume["secret"]
    items = secret.get("items") or [{"key": key, "path": key} for key in data]
    directory.mkdir(parents=True)
    os.chown(directory, 0, fs_group)
    for item in items:
        path = directory / item["path"]
        path.write_bytes(data[item["key"]])
        os.chown(path, 0, fs_group)
        path.chmod(secret.get("defaultMode", 0o644))
    return directory


def test_image_accepts_a_stamped_device_as_the_manifests_run_it(
    tmp_path: Path, image: Image, make_golden: Any, identity_runner: Any
) -> None:
    """Read-only root, the Deployment's volumes, user and environment, the registry on PostgreSQL: a stamped
    device is accepted, a revoked one is not, the probes answer, and the container stops cleanly."""
    need("mender")
    deployment = _manifests()["Deployment"]
    pod, edge = deployment["spec"]["template"]["spec"], _container(deployment)
    context = pod["securityContext"]
    uid, gid, fs_group = context["runAsUser"], context["runAsGroup"], context["fsGroup"]
    tls_port = next(p["containerPort"] for p in edge["ports"] if p["name"] == "mtls")
    health_port = next(p["containerPort"] for p in edge["ports"] if p["name"] == "health")

    with running_postgres() as pg:
        # A PKI whose registry is PostgreSQL from its start (imageprov.toml before ca init), as a fleet with
        # several edge replicas has it.
        database = f"edge_{os.getpid()}"
        pki = tmp_path / "pki"
        pki.mkdir()
        (pki / "imageprov.toml").write_text(f'[registry]\nurl = "{pg.create_database(database)}"\n')
        imageprov_pki("ca", "init", pki, "--cn", "Deploy Fleet CA", "--org", "imageprov tests", "--country", "NO")
        fleet = _fleet(tmp_path, make_golden, pki)
        # The Secrets an operator creates (deploy/README.md): the edge's PKI holds the CA's certificate and
        # the registry's URL, never the CA's key.
        in_container = f"postgresql:///{database}?host={PG_IN_CONTAINER}&user=imageprov"
        secrets = {
            "imageprov-edge-pki": {"ca-cert.pem": (pki / "ca-cert.pem").read_bytes(),
                                   "imageprov.toml": f'[registry]\nurl = "{in_container}"\n'.encode()},
            "imageprov-edge-server-tls": {"tls.crt": (fleet.server / "server-cert.pem").read_bytes(),
                                          "tls.key": (fleet.server / "server-private.key").read_bytes()},
            "imageprov-edge-mender": {"username": USER.encode(), "password": PASSWORD.encode()},
            "imageprov-edge-registry": {"pgpass": pg.passfile.read_bytes()},
        }  # fmt: skip
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = []
        for volume_mount in edge["volumeMounts"]:
            volume = volumes[volume_mount["name"]]
            if "secret" in volume:
                source = _secret_volume(tmp_path / "volumes" / volume["name"], volume,
                                        secrets[volume["secret"]["secretName"]], fs_group)  # fmt: skip
                mounts.append(Mount(volume_mount["mountPath"], "bind", source, read_only=True))
            else:
                size = volume["emptyDir"].get("sizeLimit", "64Mi").replace("Mi", "m").replace("Gi", "g")
                mounts.append(Mount(volume_mount["mountPath"], "tmpfs", options=f"mode=0777,nosuid,nodev,size={size}"))
        # PostgreSQL's socket, where the cluster would have a TCP address.
        mounts.append(Mount(PG_IN_CONTAINER, "bind", pg.socket, read_only=False))

        with running_standin() as standin:
            env = {**image.env, **{e["name"]: e["value"] for e in edge["env"]}, UPSTREAM_ENV: standin.url}
            argv = [*image.config["Entrypoint"], *(edge.get("args") or [])]
            run = Run(argv, env, uid, gid, [fs_group], mounts, writable_root=False, ports=(tls_port, health_port))
            with container(image, tmp_path, run) as running:
                _wait_ready(running, health_port)
                assert get(f"http://127.0.0.1:{health_port}/livez")[0] == 200
                assert get(f"http://127.0.0.1:{health_port}/metrics")[0] == 404  # the probes, nothing else
                url = f"https://localhost:{tls_port}"
                good = _client_root(tmp_path, fleet.images / "good-1.sdimg", "good", None, url)
                accepted = _bootstrap(identity_runner, good, "02:00:00:00:00:01")
                assert accepted.returncode == 0, accepted.stderr[-3000:] + running.output()[-3000:]
                revoked = _client_root(tmp_path, fleet.images / "rev-1.sdimg", "rev", None, url)
                assert _bootstrap(identity_runner, revoked, "02:00:00:00:00:02").returncode != 0

                # Read-only root, non-root processes with no capability.
                with pytest.raises(OSError) as refused:
                    (Path(f"/proc/{running.pid}/root") / "etc" / "probe").write_text("x")
                assert refused.value.errno == errno.EROFS
                _assert_confined(running, uid, secret=PASSWORD)
                # libpq's password file: copied where only the edge's user reads it (libpq ignores a
                # group-readable one, and a Secret's files are).
                copy = Path(f"/proc/{running.pid}/root") / str(ENTRY.SECRETS).lstrip("/") / "pgpass"
                assert stat.S_IMODE(copy.stat().st_mode) == 0o600 and copy.stat().st_uid == uid
            assert running.exit_code == 0, running.output()[-3000:]
        assert _statuses(standin) == {"02:00:00:00:00:01": "accepted"}
    lines = [d for d in _log_lines(running) if "decision" in d]
    assert ("good-1", "accepted") in [(d["cn"], d["decision"]) for d in lines]
    assert ("rev-1", "revoked") in [(d["cn"], d.get("reason")) for d in lines]


def test_image_runs_as_mtls_ambassador_is_run(
    tmp_path: Path, image: Image, make_golden: Any, pki: Path, identity_runner: Any
) -> None:
    """mtls-ambassador's documented ways of running its image, with this image's name: its variables (the Mender
    password among them), server.crt and server.key in /etc/mtls/certs/server, its CA where each version of its
    documentation mounts it, a writable container layer and no other volume. A stamped device is accepted; the
    password is in no process's argv or environment, only in a 0600 file on a tmpfs; MTLS_DEBUG_LOG shows
    nginx's refusals; a key the image's user cannot read is refused at start; if edge serve dies, the
    container ends (to be restarted)."""
    need("mender")
    fleet = _fleet(tmp_path, make_golden, pki)
    files = tmp_path / "ambassador"
    files.mkdir()
    # As `docker run -v` or a Secret volume gives them: the host's files, root's.
    shutil.copy(fleet.server / "server-cert.pem", files / "server.crt")
    shutil.copy(fleet.server / "server-private.key", files / "server.key")
    shutil.copy(pki / "ca-cert.pem", files / "ca.crt")
    server_files = [
        Mount("/etc/mtls/certs/server/server.crt", "bind", files / "server.crt", file=True),
        Mount("/etc/mtls/certs/server/server.key", "bind", files / "server.key", file=True),
    ]
    uid, gid = image.uid_gid
    tls_port, health_port = 8080, int(ENTRY.HEALTH_LISTEN.rpartition(":")[2])

    with running_standin() as standin:
        env = {**image.env, "MTLS_MENDER_USER": USER, "MTLS_MENDER_PASS": PASSWORD,
               "MTLS_MENDER_BACKEND": standin.url, "MTLS_DEBUG_LOG": "true"}  # fmt: skip

        # Its later docker run: the CA at /etc/mtls/certs/tenant-ca/tenant.ca.pem. With a key only root may
        # read (0600, as imageprov server-cert writes it): refused at once, saying what to do.
        tenant_ca = Mount("/etc/mtls/certs/tenant-ca/tenant.ca.pem", "bind", files / "ca.crt", file=True)
        (files / "server.key").chmod(0o600)
        run = Run(list(image.config["Entrypoint"]), env, uid, gid, [], [*server_files, tenant_ca],
                  writable_root=True, ports=(tls_port, health_port))  # fmt: skip
        with container(image, tmp_path, run) as running:
            wait_for(lambda: running.proc.poll() is not None, "the container to refuse to start", timeout=60)
        assert running.exit_code == 2
        output = running.output()
        assert "fleet CA from /etc/mtls/certs/tenant-ca/tenant.ca.pem" in output
        assert "/etc/mtls/certs/server/server.key is not readable by this container's user (uid 10001)" in output

        # Its Kubernetes manifest: MTLS_TENANT_CA_PEM naming /etc/ssl/certs/ca.crt, where 1.0's docker run put it;
        # a Secret's files, 0644.
        (files / "server.key").chmod(0o644)
        ca = Mount("/etc/ssl/certs/ca.crt", "bind", files / "ca.crt", file=True)
        run = Run(list(image.config["Entrypoint"]), {**env, "MTLS_TENANT_CA_PEM": "/etc/ssl/certs/ca.crt"}, uid,
                  gid, [], [*server_files, ca], writable_root=True, ports=(tls_port, health_port))  # fmt: skip
        with container(image, tmp_path, run) as running:
            _wait_ready(running, health_port)
            url = f"https://localhost:{tls_port}"
            good = _client_root(tmp_path, fleet.images / "good-1.sdimg", "good", None, url)
            accepted = _bootstrap(identity_runner, good, "02:00:00:00:00:03")
            assert accepted.returncode == 0, accepted.stderr[-3000:] + running.output()[-3000:]
            # A TLS client without a certificate: refused by nginx, and said so with MTLS_DEBUG_LOG.
            context = ssl.create_default_context(cafile=str(pki / "ca-cert.pem"))
            with (
                socket.create_connection(("127.0.0.1", tls_port)) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(b"GET /api/devices/v1/authentication/auth_requests HTTP/1.1\r\nHost: localhost\r\n\r\n")
                assert tls.recv(4096).startswith(b"HTTP/1.1 400 ")
            wait_for(lambda: "client sent no required SSL certificate" in running.output(), "nginx's info line")

            _assert_confined(running, uid, secret=PASSWORD)
            written = Path(f"/proc/{running.pid}/root") / str(ENTRY.SECRETS).lstrip("/") / "mender-password"
            assert written.read_text() == PASSWORD
            assert stat.S_IMODE(written.stat().st_mode) == 0o600 and written.stat().st_uid == uid
            shm = [line.split() for line in Path(f"/proc/{running.pid}/mountinfo").read_text().splitlines()]
            assert any(f[4] == "/dev/shm" and f[f.index("-") + 1] == "tmpfs" for f in shm), "secrets on a tmpfs"

            # edge serve dies: nginx is stopped and the container ends, not ready, for its restart policy.
            (serve,) = [
                pid for pid in running.processes() if b"edge\0serve" in Path(f"/proc/{pid}/cmdline").read_bytes()
            ]
            os.kill(serve, signal.SIGKILL)
            wait_for(lambda: running.proc.poll() is not None, "the container to end", timeout=40)
        assert running.exit_code == 1, running.output()[-3000:]
        assert _statuses(standin) == {"02:00:00:00:00:03": "accepted"}
    lines = _log_lines(running)
    assert "edge serve exited (-9): stopping" in [line.get("message") for line in lines]
    warnings = [line["message"] for line in lines if line.get("level") == "warning"]
    assert any("MTLS_MENDER_PASS is in the environment" in w and "/etc/imageprov/mender" in w for w in warnings)
    # The ambassador's behaviour, and said so: any identity, no revocation without a registry.
    assert any("no revocation source" in w for w in warnings), warnings
    assert any("--identity none" in w for w in warnings), warnings
    assert ("good-1", "accepted") in [(d["cn"], d["decision"]) for d in lines if "decision" in d]
