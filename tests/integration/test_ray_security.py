"""The local Ray runtime the CLI starts is not open to the network (issue 8, deliverable 7).

Ray 2.60's GCS, raylets, workers and agents listen on all interfaces whatever node address is given, so the
runtime that ``ensure_ray`` starts must require a token: the test lists the sockets its processes listen on
(they do include non-loopback ones, which is why) and shows that a client without the token is refused while
one with it connects.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.ray

SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys
    import psutil, ray
    from puregen_dist.pipeline.purify import ensure_ray

    ensure_ray(num_cpus=1)

    @ray.remote
    def mode():
        return os.environ.get("RAY_AUTH_MODE")

    worker_mode = ray.get(mode.remote())
    node = ray._private.worker._global_node
    session = os.path.basename(node.get_session_dir_path())
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
    sockets = sorted({(c.laddr.ip, c.laddr.port) for c in psutil.net_connections("tcp")
                      if c.status == psutil.CONN_LISTEN and c.pid in pids})
    connect = "import ray; ray.init(address=%r); print('CONNECTED')" % node.gcs_address
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    stranger = subprocess.run([sys.executable, "-c", connect], env={**clean, "RAY_AUTH_MODE": "disabled"},
                              capture_output=True, text=True, timeout=120)
    friend = subprocess.run([sys.executable, "-c", connect], env=dict(os.environ),
                            capture_output=True, text=True, timeout=120)
    token_path = os.environ["RAY_AUTH_TOKEN_PATH"]
    print(json.dumps({"driver_mode": os.environ["RAY_AUTH_MODE"], "worker_mode": worker_mode,
                      "token_file_mode": oct(os.stat(token_path).st_mode & 0o777), "sockets": sockets,
                      "stranger": "CONNECTED" in stranger.stdout, "friend": "CONNECTED" in friend.stdout}))
    ray.shutdown()
""")


def test_local_runtime_requires_a_token_on_every_listening_socket(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["driver_mode"] == "token" and result["worker_mode"] == "token"
    assert result["token_file_mode"] == "0o600"
    exposed = [(ip, port) for ip, port in result["sockets"] if not ip.startswith("127.") and ip != "::1"]
    assert result["sockets"], "no listening socket found for the local Ray session"
    # Ray listens beyond loopback (why the token matters); a client without the token is refused.
    assert exposed
    assert result["stranger"] is False
    assert result["friend"] is True
