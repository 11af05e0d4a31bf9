"""A private network for the local Ray runtime: a Linux network namespace that holds only loopback.

Ray 2.60 binds its GCS, raylet, core-worker and agent servers to every interface (``::``) and has no option to
bind them to loopback only (``_node_ip_address="127.0.0.1"`` and ``ray start --node-ip-address 127.0.0.1`` are
both rewritten or ignored for the bind). Token authentication (:func:`puregen_dist.pipeline.purify.
enable_local_token_auth`) makes those ports refuse strangers, but they still listen. A command that starts a
local Ray instance therefore re-runs itself, by default, in a new network namespace whose only interface is
``lo``: Ray still binds ``::``, but inside a namespace where that is loopback, so nothing of it listens on the
machine's network (the ``bwrap --unshare-net`` idea, done with two system calls).

``PUREGEN_RAY_NETWORK`` chooses:

- ``auto`` (default): private when the command starts a local Ray instance, everything it must reach is local
  (tracking store, artifact store) and the kernel allows it; otherwise the host network, token-protected, with
  one log line saying why;
- ``private``: private or a clear error (exit 2) before anything is computed;
- ``host``: never (the behaviour before; Ray's ports are token-protected).

The namespace is entered by the child between ``fork`` and ``exec`` (``subprocess``' ``preexec_fn``), so the
parent may have threads. As root it needs only ``CLONE_NEWNET``; otherwise an unprivileged user namespace is
created as well, mapping the user's own uid and gid onto themselves (files keep their owner).
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from puregen_dist.config.errors import UserInputError
from puregen_dist.tracking.redaction import redact_uri

log = logging.getLogger(__name__)

MODE_ENV = "PUREGEN_RAY_NETWORK"
MODES = ("auto", "private", "host")
INSIDE_ENV = "PUREGEN_RAY_NETWORK_PRIVATE"
"""Set in the re-run command's environment: it is already inside the private network."""
PRIVATE_NODE_ADDRESS = "127.0.0.2"
"""The node address of a Ray instance started inside the private network: a loopback address Ray takes as
given (it rewrites 127.0.0.1 to the machine's address, looked up by routing towards 8.8.8.8, which fails in the
namespace with a warning and falls back to the host name)."""

CLONE_NEWUSER = 0x10000000
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
SIOCSIFFLAGS, SIOCSIFADDR, SIOCSIFNETMASK = 0x8914, 0x8916, 0x891C
IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x1, 0x8, 0x40
_LIBC = ctypes.CDLL(None, use_errno=True)
_unshare, _prctl = (getattr(_LIBC, name, None) for name in ("unshare", "prctl"))  # None where not Linux
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
"""The directory holding the ``puregen_dist`` package: the re-run imports exactly this copy."""
RERUN = ("import runpy, sys; sys.path.pop(0); "  # drop the cwd entry (Python 3.11's -P): never the cwd's copy
         "runpy.run_module('puregen_dist', run_name='__main__', alter_sys=True)")
"""``python -c RERUN ARGV...`` runs ``python -m puregen_dist ARGV...`` from ``PACKAGE_ROOT`` (first on
``PYTHONPATH``), on every supported Python (3.10 has no ``-P``)."""


def network_mode() -> str:
    """``$PUREGEN_RAY_NETWORK`` (default ``auto``), checked."""
    mode = os.environ.get(MODE_ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise UserInputError(f"{MODE_ENV}={os.environ[MODE_ENV]!r}: expected one of {', '.join(MODES)}")
    return mode


def inside_private_network() -> bool:
    """True in a command re-run by :func:`run_in_private_network`."""
    return os.environ.get(INSIDE_ENV) == "1"


def local_ray_options() -> dict[str, str]:
    """Extra ``ray.init`` arguments for a local instance: the private node address inside the private network,
    else none."""
    return {"_node_ip_address": PRIVATE_NODE_ADDRESS} if inside_private_network() else {}


def interfaces() -> list[str]:
    """Network interfaces of this process' namespace (``/proc/self/net/dev``), e.g. ``["lo", "eth0"]``."""
    lines = Path("/proc/self/net/dev").read_text().splitlines()[2:]
    return [line.split(":", 1)[0].strip() for line in lines]


def remote_locations(tracking_uri: str | None, stores: Sequence[str | None]) -> list[str]:
    """The locations among a command's tracking URI and artifact stores that a private network cannot reach:
    anything but a local path, ``file:`` or ``sqlite:`` URI (an MLflow server, even on 127.0.0.1 of the host, is
    outside the namespace)."""
    found = []
    if tracking_uri and "://" in tracking_uri and not tracking_uri.startswith(("sqlite:", "file:")):
        found.append(f"tracking {redact_uri(tracking_uri)}")
    for store in stores:
        if store and "://" in store and not store.startswith("file://"):
            found.append(f"store {store}")
    return found


def unavailable_reason() -> str | None:
    """Why a private network cannot be made here (None: it can): not Linux, or the kernel or a container's
    seccomp profile refuses the namespaces. Probed with a tiny child process (about 20 ms); for tests and
    diagnostics (a command just tries, :func:`run_in_private_network`)."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux-only (this is {sys.platform})"
    try:
        subprocess.run([sys.executable, "-I", "-S", "-c", ""], preexec_fn=enter_private_network, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)
    except (subprocess.SubprocessError, OSError) as exc:
        return f"the kernel refused a network namespace ({exc})"
    return None


def host_addresses() -> list[str]:
    """The non-loopback IPv4 addresses this machine's host name resolves to. A Ray instance started without an
    explicit node address (not through ``ensure_ray``: a plugin's own ``ray.init()``) finds no route out of a
    private namespace and falls back to the host name; these addresses are therefore added to the namespace's
    loopback, where they reach Ray and nothing else."""
    try:
        _, _, found = socket.gethostbyname_ex(socket.gethostname())
    except OSError:
        return []
    return sorted({address for address in found if not address.startswith("127.")})


def enter_private_network(addresses: Sequence[str] = ()) -> None:
    """Move the calling process into a new network namespace, bring its loopback up and give the loopback the
    IPv4 ``addresses`` too (aliases ``lo:0``, ``lo:1``, ... with /32 masks); the process gets SIGTERM when its
    parent dies. Runs in the forked child before ``exec``: system calls through libc functions resolved at import
    (a ``dlsym`` after ``fork`` could wait on a loader lock held by another thread of the parent). Root:
    ``unshare(CLONE_NEWNET)``; otherwise (or when root lacks ``CAP_SYS_ADMIN``, as in a default container) a user
    namespace too, with identity uid/gid maps."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)  # the re-run ends with the command the user started
    uid, gid = os.geteuid(), os.getegid()
    if uid != 0 or _unshare(CLONE_NEWNET) != 0:
        if _unshare(CLONE_NEWUSER | CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            raise OSError(code, f"unshare: {os.strerror(code)}")
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING))
        for index, address in enumerate(addresses):
            name = f"lo:{index}".encode()
            fcntl.ioctl(sock, SIOCSIFADDR, _ifreq_address(name, address))
            fcntl.ioctl(sock, SIOCSIFNETMASK, _ifreq_address(name, "255.255.255.255"))


def _ifreq_address(name: bytes, address: str) -> bytes:
    """A ``struct ifreq`` holding interface ``name`` and an IPv4 ``struct sockaddr_in`` (40 bytes)."""
    return struct.pack("16sH2x4s8x8x", name, socket.AF_INET, socket.inet_aton(address))


def _write(path: str, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY)
    try:
        os.write(descriptor, text.encode())
    finally:
        os.close(descriptor)


class PrivateNetworkRefused(OSError):
    """The kernel (or a container's seccomp profile) refused the namespaces; nothing was started."""


def run_in_private_network(argv: Sequence[str]) -> int:
    """Run ``puregen-dist ARGV`` (this very package) in a new private network namespace and return its exit
    code (128 + N when a signal N ended it). Ctrl-C reaches the child with the terminal's process group; this
    parent only waits for it to finish cleanly.

    Raises:
        PrivateNetworkRefused: the namespace could not be made (the command did not start).
    """
    if not sys.platform.startswith("linux"):
        raise PrivateNetworkRefused(f"network namespaces are Linux-only (this is {sys.platform})")
    env = {**os.environ, INSIDE_ENV: "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-c", RERUN, *argv]
    addresses = host_addresses()  # resolved here: name lookups may take locks a forked child must not
    try:
        child = subprocess.Popen(command, env=env, preexec_fn=functools.partial(enter_private_network, addresses))
    except subprocess.SubprocessError as exc:  # the namespace was refused in the child, before exec
        raise PrivateNetworkRefused(f"the kernel refused a network namespace ({exc})") from None
    while True:
        try:
            code = child.wait()
            break
        except KeyboardInterrupt:
            continue  # the child got the same SIGINT and is winding down
    return 128 + abs(code) if code < 0 else code


def maybe_rerun_private(argv: Sequence[str] | None, *, starts_local_ray: bool, tracking_uri: str | None,
                        stores: Sequence[str | None] = ()) -> int | None:
    """Decide where a command that may start Ray runs. Returns the exit code of the command re-run in a private
    network, or None: carry on in this process (host network, already private, or ``argv`` None: called
    in-process, so the caller keeps its process). Raises UserInputError for
    ``PUREGEN_RAY_NETWORK=private`` when that cannot be had, before anything is computed."""
    mode = network_mode()
    if inside_private_network():
        log.info("Ray network: private namespace (interfaces: %s)", ", ".join(interfaces()))
        return None
    if mode == "host" or not starts_local_ray or argv is None:
        if mode == "private" and not starts_local_ray:
            log.info("%s=private: this command joins an existing Ray cluster; nothing to isolate", MODE_ENV)
        return None
    remote = remote_locations(tracking_uri, stores)
    reason = f"it must reach {', '.join(remote)}" if remote else None
    if reason is None:
        log.info("starting the local Ray instance in a private network namespace (only loopback; "
                 "%s=host to turn this off)", MODE_ENV)
        try:
            return run_in_private_network(argv)
        except PrivateNetworkRefused as exc:  # no probe beforehand: the attempt itself tells
            reason = str(exc)
    if mode == "private":
        raise UserInputError(f"{MODE_ENV}=private: cannot run the local Ray instance in a private network: "
                             f"{reason}")
    log.log(logging.INFO if remote else logging.WARNING, "local Ray runs on the host network (its ports refuse "
            "clients without this run's private token): no private network namespace because %s", reason)
    return None


__all__ = ["MODE_ENV", "MODES", "INSIDE_ENV", "PRIVATE_NODE_ADDRESS", "network_mode", "inside_private_network",
           "local_ray_options", "interfaces", "remote_locations", "unavailable_reason", "host_addresses",
           "enter_private_network", "PrivateNetworkRefused", "run_in_private_network", "maybe_rerun_private"]
