"""The local Ray runtime a sweep starts is not open to the network (issue 8, deliverable 7; issue 16, item 4).

Ray 2.60's GCS, raylets, core workers and agents listen on all interfaces whatever node address is given
(``ray.init(_node_ip_address="127.0.0.1")`` is rewritten to the machine's address, and the C++ gRPC servers bind
``::``), so the runtime that ``ensure_ray`` starts must require a token. The test runs a small local sweep and,
while it runs, records every TCP socket the session's processes listen on, and knocks on each one as a stranger
(no token): a real Ray gRPC method must answer UNAUTHENTICATED and an HTTP endpoint 401. The only sockets that
answer a stranger are Prometheus metrics exporters (the dashboard agent's and the autoscaler monitor's:
read-only counters and gauges, no code path; Ray 2.60 has no switch for them), which the test names. Nothing of MLflow listens at all (sqlite), the dashboard is
off, the token file is private, and a full client without the token is refused while one with it connects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.ray

SWEEP = """
name: sec
base:
  output_dir: {root}/out
  data: {{dataset: digits, train_per_class: 8, test_fraction: 0.25}}
  attack: {{name: badnets, target_class: 0, budget: 0.1, label_mode: dirty}}
  defense: {{name: jpeg, quality: 50}}
  classifier: {{name: small_cnn, epochs: 1, batch_size: 32, threads: 1, crop_padding: 1, flip: false}}
  eval: {{magnifications: [1.0]}}
settings:
  seeds: [0]
  trial_cpus: 1
  storage: {root}/tune
  store: {root}/store
  pipeline: {{actors: 1, batch_size: 32, cpu_tasks: 1, craft: {{num_cpus: 1}}}}
"""

SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys, threading, time, urllib.error, urllib.request
    import grpc, psutil, ray
    from puregen_dist.cli import main
    from puregen_dist.pipeline.purify import ensure_ray

    ensure_ray(num_cpus=2)
    node = ray._private.worker._global_node
    session = os.path.basename(node.get_session_dir_path())
    # one real method per Ray gRPC service: without the token each answers UNAUTHENTICATED
    METHODS = ["/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.NodeManagerService/GetNodeStats",
               "/ray.rpc.CoreWorkerService/GetCoreWorkerStats", "/ray.rpc.ReporterService/GetTraceback",
               "/ray.rpc.ObjectManagerService/Pull", "/ray.rpc.RuntimeEnvGcsService/PinRuntimeEnvURI"]

    def family():
        pids = {os.getpid()}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if session in " ".join(proc.info["cmdline"] or []):
                    pids.add(proc.pid)
            except psutil.Error:
                pass
        for pid in list(pids):
            try:
                pids.update(child.pid for child in psutil.Process(pid).children(recursive=True))
            except psutil.Error:
                pass
        return pids

    def knock(ip, port):
        host = "127.0.0.1" if ip in ("0.0.0.0", "::") else ip.removeprefix("::ffff:")
        answers = []
        channel = grpc.insecure_channel(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        for method in METHODS:
            call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            try:
                call(b"", timeout=5)
                answers.append("grpc-ok")
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                    answers.append("grpc-" + exc.code().name)
        channel.close()
        # A Prometheus exporter (prometheus_client) answers every path with its metrics; an application that also
        # serves metrics would answer /api/jobs/ otherwise.
        kinds = []
        for path in ("/", "/api/jobs/"):
            try:
                with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=5) as response:
                    kind = response.headers.get("Content-Type", "")
                    kinds.append("metrics" if kind.startswith("text/plain; version=") or "openmetrics" in kind
                                 else "200")
            except urllib.error.HTTPError as exc:
                kinds.append(str(exc.code))
            except Exception:
                kinds.append("none")
        if kinds == ["metrics", "metrics"]:
            answers.append("http-200-metrics")
        elif "200" in kinds or "metrics" in kinds:
            answers.append("http-200")
        elif kinds[0] != "none":
            answers.append(f"http-{kinds[0]}")
        return answers

    seen, done = {}, threading.Event()

    def watch():
        while not done.is_set():
            pids = family()
            for c in psutil.net_connections("tcp"):
                if c.status == psutil.CONN_LISTEN and c.pid in pids and (c.laddr.ip, c.laddr.port) not in seen:
                    try:
                        proc = psutil.Process(c.pid)
                        name, command = proc.name(), " ".join(proc.cmdline())
                    except psutil.Error:
                        name, command = "?", ""
                    seen[(c.laddr.ip, c.laddr.port)] = {"ip": c.laddr.ip, "port": c.laddr.port, "process": name,
                                                        "command": command,
                                                        "answers": knock(c.laddr.ip, c.laddr.port)}
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code = main(["-q", "sweep", sys.argv[1]])
    time.sleep(1)
    done.set()
    watcher.join()

    @ray.remote
    def mode():
        return os.environ.get("RAY_AUTH_MODE")

    worker_mode = ray.get(mode.remote())
    connect = "import ray; ray.init(address=%r); print('CONNECTED')" % node.gcs_address
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    # Two connection attempts, not Ray's default twenty: each is refused the same way (AuthenticationError)
    stranger = subprocess.run([sys.executable, "-c", connect], env={**clean, "RAY_AUTH_MODE": "disabled",
                                                                    "RAY_gcs_server_port_wait_time_s": "2"},
                              capture_output=True, text=True, timeout=120)
    friend = subprocess.run([sys.executable, "-c", connect], env=dict(os.environ),
                            capture_output=True, text=True, timeout=120)
    token_path = os.environ["RAY_AUTH_TOKEN_PATH"]
    print(json.dumps({"sweep_exit": code, "driver_mode": os.environ["RAY_AUTH_MODE"], "worker_mode": worker_mode,
                      "token_file_mode": oct(os.stat(token_path).st_mode & 0o777), "sockets": list(seen.values()),
                      "stranger": "CONNECTED" in stranger.stdout, "friend": "CONNECTED" in friend.stdout,
                      "stranger_refused": "AuthenticationError" in stranger.stderr}))
    ray.shutdown()
""")


def _loopback(ip: str) -> bool:
    return ip.startswith(("127.", "::ffff:127.")) or ip == "::1"


def _watch_a_sweep(script: str, tmp_path) -> tuple[dict, str]:
    """Run ``script SWEEP_FILE`` (a watcher that runs the small sweep and prints one JSON line) in a clean
    environment: no Ray address or token, no tracking URI, the default network mode. Returns (JSON, stderr)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PUREGEN_RAY_NETWORK"))}
    sweep = tmp_path / "sec.yaml"
    sweep.write_text(SWEEP.format(root=tmp_path))
    done = subprocess.run([sys.executable, "-c", script, str(sweep)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_every_socket_of_a_local_sweep_refuses_a_stranger(tmp_path):
    """The host network (a runtime started in-process, as with ``PUREGEN_RAY_NETWORK=host``)."""
    result, _ = _watch_a_sweep(SCRIPT, tmp_path)
    assert result["sweep_exit"] == 0
    assert result["driver_mode"] == "token" and result["worker_mode"] == "token"
    assert result["token_file_mode"] == "0o600"
    assert result["stranger"] is False and result["friend"] is True
    assert result["stranger_refused"] is True  # refused for its missing token, not for another reason

    sockets = result["sockets"]
    assert {s["process"] for s in sockets} >= {"gcs_server", "raylet"}, sockets
    assert not [s for s in sockets if "mlflow" in s["process"].lower() or "gunicorn" in s["process"].lower()]
    exposed = [s for s in sockets if not _loopback(s["ip"])]
    assert exposed, "Ray 2.60 listens beyond loopback: the reason for the token"
    open_doors = [s for s in exposed if any(a in ("grpc-ok", "http-200") for a in s["answers"])]
    assert not open_doors, f"sockets that served a client without the token: {open_doors}"
    # Prometheus exporters (every path answers Content-Type text/plain; version=0.0.4) of Ray's own processes:
    # the dashboard agent's and the autoscaler monitor's (port 44217 when free). Read-only counters and gauges;
    # Ray 2.60 binds them beyond loopback, with no switch.
    metrics = [s for s in exposed if "http-200-metrics" in s["answers"]]
    assert all(s["process"].startswith("ray::") or "/ray/" in s["command"] for s in metrics), metrics
    # Every other exposed socket that answered at all refused the stranger; a socket that closed before the knock
    # (a short-lived worker) answers UNAVAILABLE, which serves no one either.
    answered = [s for s in exposed if s not in metrics and set(s["answers"]) - {"grpc-UNAVAILABLE"}]
    assert all({"grpc-UNAUTHENTICATED", "http-401"} & set(s["answers"]) for s in answered), answered
    refusing = {s["process"] for s in answered}
    assert {"gcs_server", "raylet"} <= refusing, answered
    assert any(p.startswith("ray::") and p not in ("ray::DashboardAgent", "ray::RuntimeEnvAgent")
               for p in refusing), answered  # the core workers that ran the sweep's tasks and trials


WATCH = textwrap.dedent("""
    import json, os, socket, subprocess, sys, time
    import psutil

    def tree(pid):
        try:
            root = psutil.Process(pid)
            return [root, *root.children(recursive=True)]
        except psutil.Error:
            return []

    def namespace(pid):
        try:
            return os.readlink(f"/proc/{pid}/ns/net")
        except OSError:
            return None

    def inside_listeners(pid):
        ports = set()
        for table in ("tcp", "tcp6"):
            try:
                lines = open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]
            except OSError:
                continue
            ports |= {int(line.split()[1].rsplit(":", 1)[1], 16) for line in lines if line.split()[3] == "0A"}
        return ports

    sweep = subprocess.Popen([sys.executable, "-m", "puregen_dist", "-q", "sweep", sys.argv[1]])
    own = namespace(os.getpid())
    seen, host_listening, inside, refused, answered, auth = {}, [], {}, 0, [], set()
    while sweep.poll() is None:
        procs = tree(sweep.pid)
        pids = {p.pid for p in procs}
        for c in psutil.net_connections("tcp"):
            if c.status == psutil.CONN_LISTEN and c.pid in pids:
                host_listening.append([c.laddr.ip, c.laddr.port, c.pid])
        for proc in procs:
            try:
                name = proc.name()
            except psutil.Error:
                continue
            if name not in ("gcs_server", "raylet") or name in seen:
                continue
            ns, ports = namespace(proc.pid), inside_listeners(proc.pid)
            if not ns or not ports:
                continue
            try:
                devices = [line.split(":")[0].strip()
                           for line in open(f"/proc/{proc.pid}/net/dev").read().splitlines()[2:]]
                environ = open(f"/proc/{proc.pid}/environ", "rb").read().split(b"\\0")
            except OSError:
                continue
            auth |= {e.decode() for e in environ if e.startswith(b"RAY_AUTH_MODE=")}
            seen[name] = {"namespace": ns, "interfaces": devices, "ports": sorted(ports)}
            host_ports = {c.laddr.port for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
            for port in ports - host_ports:  # the host has no listener there: a connection must be refused
                for address in ("127.0.0.1", socket.gethostbyname(socket.gethostname())):
                    try:
                        socket.create_connection((address, port), timeout=2).close()
                        answered.append([address, port, name])
                    except OSError:
                        refused += 1
        time.sleep(0.3)
    print(json.dumps({"exit": sweep.returncode, "own_namespace": own, "seen": seen, "auth": sorted(auth),
                      "host_listening": host_listening, "refused": refused, "answered": answered}))
""")


def test_a_local_sweep_listens_on_no_port_of_the_machine(tmp_path):
    """By default (``PUREGEN_RAY_NETWORK=auto``) the CLI runs a local sweep in a private network namespace that
    holds only loopback (``pipeline/isolation.py``): Ray's GCS and raylet listen there, token-protected, and no
    process of the sweep listens on any port of the machine, loopback or not: a connection to their ports
    from the host is refused."""
    from puregen_dist.pipeline.isolation import unavailable_reason

    if (reason := unavailable_reason()) is not None:
        pytest.skip(reason)
    result, stderr = _watch_a_sweep(WATCH, tmp_path)
    assert result["exit"] == 0, stderr[-3000:]
    assert set(result["seen"]) == {"gcs_server", "raylet"}, result
    for name, found in result["seen"].items():
        assert found["namespace"] != result["own_namespace"], (name, found)
        assert found["interfaces"] == ["lo"], (name, found)
    assert result["auth"] == ["RAY_AUTH_MODE=token"], "the private runtime still requires its token"
    assert result["host_listening"] == [], "a process of the sweep listened in the machine's network"
    assert result["refused"] >= 4 and result["answered"] == [], result
    assert (tmp_path / "out" / "mlflow.db").is_file()  # the sweep's results reached the host's filesystem


def test_private_network_is_refused_clearly_when_the_sweep_needs_the_network(tmp_path):
    """``PUREGEN_RAY_NETWORK=private`` with an MLflow server to reach: exit 2 naming why, before anything is
    written; an unknown mode is refused the same way."""
    sweep = tmp_path / "sec.yaml"
    sweep.write_text(SWEEP.format(root=tmp_path))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "PUREGEN_RAY_NETWORK"))}
    for mode, uri, expected in [("private", "http://user:secret@127.0.0.1:1", "it must reach tracking http://"),
                                ("bogus", None, "PUREGEN_RAY_NETWORK='bogus': expected one of auto, private, host")]:
        tracking = {"MLFLOW_TRACKING_URI": uri} if uri else {}
        done = subprocess.run([sys.executable, "-m", "puregen_dist", "-q", "sweep", str(sweep)],
                              env={**env, **tracking, "PUREGEN_RAY_NETWORK": mode}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert expected in done.stderr and "secret" not in done.stderr, done.stderr[-2000:]
        assert not (tmp_path / "store").exists() and not (tmp_path / "out").exists()
