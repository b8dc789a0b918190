#!/opt/imageprov/bin/python3
"""The edge image's entrypoint: ``imageprov edge serve`` and nginx in one container, supervised.

It takes two ways of being configured, so that the image replaces mtls-ambassador by its name alone:

imageprov's way, files mounted read-only (Kubernetes Secret volumes; deploy/kubernetes/):
  /etc/imageprov/pki/        ca-cert.pem, imageprov.toml (the registry: revocations, identity pins)
  /etc/imageprov/server/     server-cert.pem, server-private.key (nginx's TLS certificate)
  /etc/imageprov/mender/     username, and password or token (the Mender user that preauthorizes)
  /etc/imageprov/registry/   pgpass (libpq's password file for a PostgreSQL registry)

mtls-ambassador's way, as its documentation runs it:
  /etc/mtls/certs/server/server.crt and server.key; the fleet CA at $MTLS_TENANT_CA_PEM,
  /etc/ssl/certs/ca.crt or /etc/mtls/certs/tenant-ca/tenant.ca.pem; MTLS_MENDER_BACKEND,
  MTLS_MENDER_USER, MTLS_MENDER_PASS, MTLS_DEBUG_LOG; TLS on port 8080.

Either way: the Mender server from UPSTREAM_SERVER_URL (or MTLS_MENDER_BACKEND), TLS on
$IMAGEPROV_EDGE_LISTEN (0.0.0.0:8080), probes (/healthz, /livez) on $IMAGEPROV_EDGE_HEALTH_LISTEN
(0.0.0.0:8081). Arguments go to ``imageprov edge serve``; those after ``--`` to ``imageprov edge nginx``.

The root filesystem may be read-only: everything written goes to /run/imageprov (the socket, nginx's
prefix and configuration), /var/lib/nginx (nginx's temporary files: its compiled-in paths) and /tmp,
each an emptyDir or tmpfs; secrets the entrypoint writes (a password given in the environment, a
copy of pgpass) go to /dev/shm, the tmpfs every container runtime mounts, so never to a disk.

Only the standard library: this runs before anything else in the image is known to work.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

LISTEN = "0.0.0.0:8080"  # mtls-ambassador's port; the Service maps 443 to it
HEALTH_LISTEN = "0.0.0.0:8081"  # plain HTTP, no client certificate: the probes
ENV_LISTEN = "IMAGEPROV_EDGE_LISTEN"
ENV_HEALTH_LISTEN = "IMAGEPROV_EDGE_HEALTH_LISTEN"

# Writable paths: a tmpfs or emptyDir each where the root filesystem is read-only.
RUN = Path("/run/imageprov")
NGINX_TEMP = Path("/var/lib/nginx")  # Debian's nginx writes request bodies and proxy buffers here
TMP = Path("/tmp")
WRITABLE = (RUN, NGINX_TEMP, TMP)
SOCKET_DIR = RUN / "edge"  # 0700: whoever connects to the socket is believed about the certificate
SOCKET = SOCKET_DIR / "edge.sock"
NGINX_PREFIX = RUN / "nginx"  # nginx.conf and nginx.pid
# 0700, each file 0600: on the tmpfs every runtime (runc, crun; Docker, Kubernetes) mounts, whatever
# volumes the container was given.
SECRETS = Path("/dev/shm/imageprov")
COMPAT = RUN / "compat"  # mtls-ambassador's files under the names imageprov reads

# imageprov's way: mounted files.
PKI = Path("/etc/imageprov/pki")
SERVER = Path("/etc/imageprov/server")
MENDER = Path("/etc/imageprov/mender")
REGISTRY = Path("/etc/imageprov/registry")
CA_CERT = "ca-cert.pem"
SERVER_CERT, SERVER_KEY = "server-cert.pem", "server-private.key"

# mtls-ambassador's way: its CA where $MTLS_TENANT_CA_PEM says, else where its documentation mounts it
# (1.0's docker run, later ones).
ENV_AMBASSADOR_CA = "MTLS_TENANT_CA_PEM"
AMBASSADOR_CAS = (Path("/etc/ssl/certs/ca.crt"), Path("/etc/mtls/certs/tenant-ca/tenant.ca.pem"))
AMBASSADOR_SERVER = Path("/etc/mtls/certs/server")
AMBASSADOR_CERT, AMBASSADOR_KEY = "server.crt", "server.key"
ENV_DEBUG = "MTLS_DEBUG_LOG"
ENV_DENYLIST = "MTLS_BLACKLIST_PATH"  # read by edge serve itself


@dataclass(frozen=True)
class EnvSecret:
    """A secret some deployments pass in the environment: taken out of it, into a file for edge serve."""

    names: tuple[str, ...]  # the variables, the first set wins
    file: str  # under SECRETS
    flag: str  # edge serve's option that reads the file
    mounted: Path  # imageprov's way of giving it


PASSWORD = EnvSecret(("MTLS_MENDER_PASSWORD", "MTLS_MENDER_PASS"), "mender-password", "--password-file",
                     MENDER / "password")  # fmt: skip
TOKEN = EnvSecret(("IMAGEPROV_EDGE_TOKEN",), "mender-token", "--token-file", MENDER / "token")
ENV_SECRETS = (TOKEN, PASSWORD)

# Seconds nginx has to finish its requests, then edge serve, once the container is told to stop;
# within Kubernetes' default terminationGracePeriodSeconds (30).
GRACE = 20
START_TIMEOUT = 60
TRUE = ("1", "true", "yes", "on")


def log(level: str, message: str) -> None:
    """One JSON line on stderr, as edge serve writes its own."""
    line = {"time": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"), "level": level,
            "logger": "imageprov.entrypoint", "message": message}  # fmt: skip
    print(json.dumps(line), file=sys.stderr, flush=True)


class Refused(Exception):
    """The container cannot start as configured: one line saying what to mount or set."""


@dataclass
class Plan:
    serve: list[str] = field(default_factory=list)  # edge serve's options
    nginx: list[str] = field(default_factory=list)  # edge nginx's options
    env: dict[str, str] = field(default_factory=dict)  # the children's environment
    debug: bool = False


def write_secret(name: str, value: str) -> Path:
    """``value`` in SECRETS/name, 0600 from its creation; replaced whole if a restart finds it."""
    SECRETS.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = SECRETS / name
    temporary = path.with_name(path.name + ".new")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(value)
    os.replace(temporary, path)
    return path


def secrets_out_of_environment(env: dict[str, str]) -> bool:
    """Move every secret the environment holds into a 0600 file; True if any was there.

    A password in the environment is mtls-ambassador's way; edge serve reads secrets from files, and
    neither it nor nginx nor this process (it starts itself again without them) keeps it in its
    environment, where /proc/PID/environ and crash reports show it."""
    found = False
    for secret in ENV_SECRETS:
        present = [name for name in secret.names if env.get(name)]
        if not present:
            continue
        found = True
        value = env[present[0]]
        for name in secret.names:
            env.pop(name, None)
        if secret.mounted.is_file():
            log("warning", f"{present[0]} is set and {secret.mounted} is mounted: the file is used; "
                           f"drop {present[0]} from the container's environment")  # fmt: skip
            continue
        path = write_secret(secret.file, value)
        log("warning", f"{present[0]} is in the environment (mtls-ambassador's way): written to {path} (0600, "
                       f"memory) for edge serve and taken out of every process's environment; anyone who can read "
                       f"the pod's spec reads it. Mount it as a file instead: a Secret with the key "
                       f"'{secret.mounted.name}' at {secret.mounted.parent}")  # fmt: skip
    return found


def plan(env: Mapping[str, str], serve_args: Sequence[str], nginx_args: Sequence[str]) -> Plan:
    """What to run, from the mounted files and the environment (the secrets already in files)."""
    result = Plan(env=dict(env))
    result.debug = env.get(ENV_DEBUG, "").strip().lower() in TRUE
    listen = env.get(ENV_LISTEN) or LISTEN
    health = env.get(ENV_HEALTH_LISTEN) or HEALTH_LISTEN
    serve = ["--listen", f"unix:{SOCKET}"]

    if (PKI / CA_CERT).is_file():
        # The registry named in imageprov.toml: revocations at once, identities pinned.
        serve += ["--pki", str(PKI)]
        nginx_pki = PKI
    elif (ambassador_ca := ambassador_ca_of(env)) is not None:
        # mtls-ambassador's CA alone: no registry, so its behaviour, and said so (edge serve warns too).
        # Arguments given to the container come after these and win (--identity, --denylist, --crl).
        serve += ["--ca", str(ambassador_ca), "--identity", "none"]
        if not env.get(ENV_DENYLIST):
            serve += ["--no-revocation"]
        log("warning", f"fleet CA from {ambassador_ca} (mtls-ambassador's way), no registry: any identity is "
                       f"accepted and only {ENV_DENYLIST} revokes; mount a PKI at {PKI} for both")  # fmt: skip
        nginx_pki = link_as(COMPAT / "pki", {CA_CERT: ambassador_ca})
    else:
        raise Refused(f"no fleet CA: mount {PKI}/{CA_CERT} (with imageprov.toml), or {AMBASSADOR_CAS[0]}")

    if (SERVER / SERVER_CERT).is_file():
        server = SERVER
    elif (AMBASSADOR_SERVER / AMBASSADOR_CERT).is_file():
        server = link_as(COMPAT / "server", {SERVER_CERT: AMBASSADOR_SERVER / AMBASSADOR_CERT,
                                             SERVER_KEY: AMBASSADOR_SERVER / AMBASSADOR_KEY})  # fmt: skip
    else:
        raise Refused(f"no server certificate: mount {SERVER}/{SERVER_CERT} and {SERVER_KEY}, "
                      f"or {AMBASSADOR_SERVER}/{AMBASSADOR_CERT} and {AMBASSADOR_KEY}")  # fmt: skip

    for link in (nginx_pki / CA_CERT, server / SERVER_CERT, server / SERVER_KEY):
        path = link.resolve()  # the file as it was mounted, not our link to it
        if not os.access(path, os.R_OK):
            # nginx would say only "Permission denied" in the middle of its start.
            raise Refused(f"{path} is not readable by this container's user (uid {os.getuid()}): make it "
                          f"readable by that uid or group (a Secret's defaultMode with fsGroup; chmod or chown "
                          f"for a file mounted from the host), or run as its owner")  # fmt: skip

    if (MENDER / "username").is_file():
        username = (MENDER / "username").read_text().strip()
        if username:
            serve += ["--username", username]  # a name, not a secret
    for secret in ENV_SECRETS:
        if secret.mounted.is_file():
            serve += [secret.flag, str(secret.mounted)]
            break
        if (SECRETS / secret.file).is_file():
            serve += [secret.flag, str(SECRETS / secret.file)]
            break

    if (REGISTRY / "pgpass").is_file():
        # libpq ignores a password file that its group may read, and a Secret volume's files are
        # group-readable (fsGroup) or unreadable: a copy that only this user reads.
        result.env["PGPASSFILE"] = str(write_secret("pgpass", (REGISTRY / "pgpass").read_text()))

    result.serve = [*serve, *serve_args]
    result.nginx = ["--pki", str(nginx_pki), "--server-cert", str(server), "--listen", listen,
                    "--accept", f"unix:{SOCKET}", "--health-listen", health, *nginx_args]  # fmt: skip
    return result


def ambassador_ca_of(env: Mapping[str, str]) -> Path | None:
    """mtls-ambassador's fleet CA: $MTLS_TENANT_CA_PEM (which must exist), else the first of its mount paths."""
    named = env.get(ENV_AMBASSADOR_CA)
    if named:
        if not Path(named).is_file():
            raise Refused(f"{ENV_AMBASSADOR_CA}={named}: no such file")
        return Path(named)
    return next((path for path in AMBASSADOR_CAS if path.is_file()), None)


def link_as(directory: Path, links: Mapping[str, Path]) -> Path:
    """``directory`` with each name a symbolic link to its file: another layout under imageprov's names."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, target in links.items():
        if not target.is_file():
            raise Refused(f"{target} is missing")
        link = directory / name
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    return directory


def nginx_conf(plan: Plan) -> Path:
    """nginx.conf written by ``imageprov edge nginx`` under NGINX_PREFIX; Refused with its message if it fails."""
    NGINX_PREFIX.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "imageprov", "edge", "nginx", *plan.nginx], env=plan.env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    if proc.returncode != 0:
        raise Refused(f"imageprov edge nginx failed: {proc.stderr.strip()}")
    text = proc.stdout
    if plan.debug:
        # MTLS_DEBUG_LOG: nginx says why it refused a handshake (info), as the ambassador's debug log did.
        quiet = "error_log stderr warn;"
        if quiet not in text:
            raise Refused(f"{ENV_DEBUG}: the nginx configuration has no '{quiet}' to raise")
        text = text.replace(quiet, "error_log stderr info;", 1)
    conf = NGINX_PREFIX / "nginx.conf"
    conf.write_text(text)
    return conf


class Supervisor:
    """edge serve, then nginx; if either ends, the other is stopped and the container exits (to be restarted).

    As PID 1 it also reaps whatever is orphaned to it. SIGTERM or SIGINT: nginx finishes its requests
    (SIGQUIT), then edge serve stops (SIGTERM); whatever is left after GRACE seconds is killed."""

    def __init__(self) -> None:
        self.children: dict[int, str] = {}  # pid: name, in the order they were started
        # Held so that subprocess never reaps them itself (it polls Popen objects it has lost track of).
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stopping = False
        self.status = 0
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGALRM, self._kill)

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> int:
        proc = subprocess.Popen(list(argv), env=dict(env), stdin=subprocess.DEVNULL)
        self.procs.append(proc)
        self.children[proc.pid] = name
        log("info", f"started {name} (pid {proc.pid})")
        return proc.pid

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            log("info", f"{signal.Signals(signum).name}: stopping")
        self.shut_down()

    def shut_down(self) -> None:
        if not self.stopping:
            self.stopping = True
            signal.alarm(GRACE)
        self._signal_next()

    def _signal_next(self) -> None:
        """Stop the last started child still running: nginx before the service it relies on."""
        for pid, name in reversed(self.children.items()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT if name == "nginx" else signal.SIGTERM)
            return

    def _kill(self, signum: int, frame: FrameType | None) -> None:
        for pid, name in self.children.items():
            log("warning", f"{name} still running after {GRACE} s: killed")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def reap(self, block: bool) -> None:
        """Collect every child that ended; a child of ours ending while not stopping stops the rest."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            name = self.children.pop(pid, None)
            if name is None:
                continue  # an orphan reparented to PID 1
            code = os.waitstatus_to_exitcode(status)
            if self.stopping:
                log("info", f"{name} stopped ({code})")
                if self.children:
                    self._signal_next()
            else:
                log("error", f"{name} exited ({code}): stopping")
                self.status = 1
                self.shut_down()

    def wait_for_socket(self, path: Path) -> bool:
        """Until edge serve accepts connections on ``path``; False if it ended or we were told to stop."""
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            self.reap(block=False)
            if self.stopping or not self.children:
                return False
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                    return True
                except OSError:
                    pass
            time.sleep(0.1)
        log("error", f"edge serve did not listen on {path} within {START_TIMEOUT} s")
        self.status = 1
        self.shut_down()
        return False


def main(argv: Sequence[str]) -> int:
    if "--" in argv:
        cut = list(argv).index("--")
        serve_args, nginx_args = list(argv[:cut]), list(argv[cut + 1 :])
    else:
        serve_args, nginx_args = list(argv), []
    env = dict(os.environ)
    try:
        if secrets_out_of_environment(env):
            # Again, without them: this process's own environment is readable in /proc too.
            os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *argv], env)
    except OSError as exc:
        log("error", str(exc))
        return 2
    # Its signal handlers from here on: as PID 1, a signal without one is ignored, not fatal.
    supervisor = Supervisor()
    try:
        SOCKET_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        what = plan(env, serve_args, nginx_args)
        conf = nginx_conf(what)
    except (Refused, OSError) as exc:
        log("error", str(exc))
        return 2
    if supervisor.stopping:
        return 0
    global_flags = ["--debug"] if what.debug else []
    supervisor.start("edge serve", [sys.executable, "-m", "imageprov", *global_flags, "edge", "serve", *what.serve],
                     what.env)  # fmt: skip
    if supervisor.wait_for_socket(SOCKET):
        nginx = shutil.which("nginx", path=what.env.get("PATH", os.defpath)) or "/usr/sbin/nginx"
        supervisor.start("nginx", [nginx, "-p", f"{NGINX_PREFIX}/", "-c", str(conf), "-e", "stderr",
                                   "-g", "daemon off;"], what.env)  # fmt: skip
    supervisor.reap(block=True)
    return supervisor.status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
