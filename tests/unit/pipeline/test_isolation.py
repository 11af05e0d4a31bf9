"""The private network a local Ray runtime runs in (``pipeline/isolation.py``; issue 16, item 4)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from puregen_dist.config.errors import UserInputError
from puregen_dist.pipeline import isolation
from puregen_dist.pipeline.isolation import (
    enter_private_network,
    maybe_rerun_private,
    network_mode,
    remote_locations,
    unavailable_reason,
)

REASON = unavailable_reason()
needs_namespaces = pytest.mark.skipif(REASON is not None, reason=str(REASON))

PROBE = textwrap.dedent("""
    import json, socket, sys
    devices = [l.split(":")[0].strip() for l in open("/proc/self/net/dev").read().splitlines()[2:]]
    server = socket.socket(socket.AF_INET6)
    server.bind(("::", 0))
    server.listen()
    socket.create_connection(("127.0.0.1", server.getsockname()[1]), timeout=5).close()  # loopback is up
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
        host = "reached"
    except OSError:
        host = "refused"
    print(json.dumps({"interfaces": devices, "host_listener": host}))
""")


@pytest.fixture
def host_listener():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def _probe_in_private_network(port: int, preexec=enter_private_network) -> dict:
    import json

    done = subprocess.run([sys.executable, "-c", PROBE, str(port)], preexec_fn=preexec, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize(("value", "mode"), [(None, "auto"), ("", "auto"), ("Private", "private"), ("host", "host")])
def test_mode_from_the_environment(monkeypatch, value, mode):
    if value is None:
        monkeypatch.delenv("PUREGEN_RAY_NETWORK", raising=False)
    else:
        monkeypatch.setenv("PUREGEN_RAY_NETWORK", value)
    assert network_mode() == mode


def test_an_unknown_mode_is_refused_by_name(monkeypatch):
    monkeypatch.setenv("PUREGEN_RAY_NETWORK", "loopback")
    with pytest.raises(UserInputError, match="PUREGEN_RAY_NETWORK='loopback': expected one of auto, private, host"):
        network_mode()


def test_only_local_locations_fit_a_private_network():
    local = remote_locations("sqlite:////tmp/x/mlflow.db", ["outputs/store", "file:///mnt/store", None])
    assert local == [] and remote_locations(None, []) == [] and remote_locations("/tmp/mlruns", []) == []
    remote = remote_locations("https://alice:pw@mlflow.example:5000", ["s3://bucket/store", "/local"])
    assert remote[1:] == ["store s3://bucket/store"]
    assert remote[0].startswith("tracking https://") and remote[0].endswith("@mlflow.example:5000")
    assert "alice" not in remote[0] and "pw" not in remote[0]  # no credentials named
    assert remote_locations("http://127.0.0.1:5000", []) == ["tracking http://127.0.0.1:5000"]  # the host's too


@needs_namespaces
def test_a_private_network_holds_only_a_working_loopback(host_listener):
    seen = _probe_in_private_network(host_listener)
    assert seen == {"interfaces": ["lo"], "host_listener": "refused"}
    assert "lo" in isolation.interfaces()  # this process keeps the host's network


@needs_namespaces
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to an unprivileged user needs root")
def test_an_unprivileged_user_gets_one_through_a_user_namespace(host_listener):
    """Not root: a user namespace is created too, mapping the user's own ids (files keep their owner)."""
    import ctypes
    import json

    "127.0.0.1".encode("idna")  # load the codec getaddrinfo uses: nobody cannot read the interpreter's files
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # no exec: the interpreter's files need not be readable by nobody
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            ctypes.CDLL(None).prctl(4, 1)  # PR_SET_DUMPABLE: a setuid from root clears it, a login never does
            try:
                enter_private_network()
            except OSError as exc:
                os.write(write, json.dumps({"skip": str(exc)}).encode())
                os._exit(0)
            with socket.socket(socket.AF_INET6) as server:
                server.bind(("::", 0))
                server.listen()
                socket.create_connection(("127.0.0.1", server.getsockname()[1]), timeout=5).close()
            try:
                socket.create_connection(("127.0.0.1", host_listener), timeout=5).close()
                host = "reached"
            except OSError:
                host = "refused"
            os.write(write, json.dumps({"uid": os.getuid(), "interfaces": isolation.interfaces(),
                                        "host_listener": host}).encode())
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test with it
            os.write(write, json.dumps({"error": repr(exc)}).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        seen = json.loads(pipe.read() or "{}")
    os.waitpid(child, 0)
    if "skip" in seen:
        pytest.skip(f"unprivileged user namespaces are off here: {seen['skip']}")
    assert seen == {"uid": 65534, "interfaces": ["lo"], "host_listener": "refused"}


def test_the_decision(monkeypatch):
    """host mode, a cluster to join, an in-process call (no argv) and an already private command all carry on
    here; ``private`` with a server to reach is a clear error before anything runs."""
    monkeypatch.delenv(isolation.INSIDE_ENV, raising=False)
    monkeypatch.setattr(isolation, "run_in_private_network", lambda argv: pytest.fail("re-ran"))
    monkeypatch.setenv("PUREGEN_RAY_NETWORK", "host")
    assert maybe_rerun_private(["sweep", "x.yaml"], starts_local_ray=True, tracking_uri=None) is None
    monkeypatch.setenv("PUREGEN_RAY_NETWORK", "private")
    assert maybe_rerun_private(["sweep", "x.yaml"], starts_local_ray=False, tracking_uri=None) is None
    assert maybe_rerun_private(None, starts_local_ray=True, tracking_uri=None) is None
    with pytest.raises(UserInputError, match="PUREGEN_RAY_NETWORK=private: .* it must reach tracking http://mlflow:5000"):
        maybe_rerun_private(["sweep", "x.yaml"], starts_local_ray=True, tracking_uri="http://mlflow:5000")
    monkeypatch.setenv("PUREGEN_RAY_NETWORK", "auto")
    assert maybe_rerun_private(["sweep", "x.yaml"], starts_local_ray=True, tracking_uri="http://mlflow:5000") is None
    monkeypatch.setenv(isolation.INSIDE_ENV, "1")
    assert maybe_rerun_private(["sweep", "x.yaml"], starts_local_ray=True, tracking_uri=None) is None


def test_a_refused_namespace_is_a_clear_error_or_the_host_network(monkeypatch):
    """No probe before the re-run: when the kernel refuses the namespace in the child (before exec), nothing
    started; ``private`` is then exit 2 naming why, ``auto`` carries on here."""
    def refuse(addresses=()):
        raise OSError(1, "unshare: Operation not permitted")

    monkeypatch.delenv(isolation.INSIDE_ENV, raising=False)
    monkeypatch.setattr(isolation, "enter_private_network", refuse)
    monkeypatch.setenv("PUREGEN_RAY_NETWORK", "private")
    with pytest.raises(UserInputError, match="PUREGEN_RAY_NETWORK=private: .* refused a network namespace"):
        maybe_rerun_private(["--help"], starts_local_ray=True, tracking_uri=None)
    monkeypatch.setenv("PUREGEN_RAY_NETWORK", "auto")
    assert maybe_rerun_private(["--help"], starts_local_ray=True, tracking_uri=None) is None


@needs_namespaces
def test_the_rerun_runs_this_package_not_the_working_directory_s(tmp_path, monkeypatch):
    """The command is re-run without the cwd on the path and this package's root first: a ``puregen_dist`` directory
    in the current directory is not what runs, and the exit code comes back."""
    decoy = tmp_path / "puregen_dist"
    decoy.mkdir()
    (decoy / "__main__.py").write_text("raise SystemExit(41)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(isolation.INSIDE_ENV, raising=False)
    assert isolation.run_in_private_network(["--help"]) == 0
    assert isolation.run_in_private_network(["no-such-command"]) == 2  # argparse's usage error


def test_host_addresses_are_the_host_name_s_non_loopback_ipv4(monkeypatch):
    monkeypatch.setattr(socket, "gethostbyname_ex", lambda name: (name, [], ["127.0.1.1", "10.0.0.5", "10.0.0.5"]))
    assert isolation.host_addresses() == ["10.0.0.5"]

    def unresolvable(name):
        raise socket.gaierror("no such host")

    monkeypatch.setattr(socket, "gethostbyname_ex", unresolvable)
    assert isolation.host_addresses() == []


RAY_TASK = textwrap.dedent("""
    import socket, ray
    ray.init(include_dashboard=False, num_cpus=1)

    @ray.remote
    def where():
        return ray.util.get_node_ip_address()

    print(socket.gethostbyname(socket.gethostname()), ray.get(where.remote(), timeout=90))
    ray.shutdown()
""")


@needs_namespaces
@pytest.mark.ray
@pytest.mark.skipif(os.geteuid() != 0, reason="a private /etc/hosts (mount namespace) needs root")
def test_ray_runs_privately_where_the_host_name_resolves_beyond_loopback(tmp_path):
    """Ray finds no route out of the namespace and falls back to the host name for its node address. On a
    machine whose /etc/hosts maps the host name to its network address (simulated: a private mount of
    /etc/hosts), that address must exist inside the namespace, or Ray waits forever for its own GCS (seen:
    a 120 s timeout without the alias). The alias on the namespace's loopback makes it work."""
    import ctypes
    import functools

    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n10.99.0.7 {socket.gethostname()}\n")
    libc = ctypes.CDLL(None, use_errno=True)

    def private_hosts_file(addresses) -> None:
        if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
        libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None)  # MS_REC | MS_PRIVATE
        if libc.mount(str(hosts).encode(), b"/etc/hosts", None, 0x1000, None) != 0:  # MS_BIND
            raise OSError(ctypes.get_errno(), "mount --bind /etc/hosts")
        enter_private_network(addresses)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    done = subprocess.run([sys.executable, "-c", RAY_TASK], preexec_fn=functools.partial(private_hosts_file,
                          ["10.99.0.7"]), env={**env, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["10.99.0.7", "10.99.0.7"]
