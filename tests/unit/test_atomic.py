from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from puregen_dist.atomic import DiskFullError, atomic_dir, atomic_file, atomic_write_text


class Crash(Exception):
    pass


def _names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# ---------------------------------------------------------------------------------------------------- files


def test_atomic_file_writes_bytes_and_text_with_readable_permissions(tmp_path):
    with atomic_file(tmp_path / "sub" / "a.bin") as handle:
        handle.write(b"\x00\x01")
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"\x00\x01"
    path = atomic_write_text(tmp_path / "b.txt", "é\r\nline\n")
    assert path == tmp_path / "b.txt" and path.read_bytes() == "é\r\nline\n".encode()  # UTF-8, untranslated
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert _names(tmp_path) == ["b.txt", "sub"]


def test_the_target_is_never_half_written_and_an_error_leaves_no_temporary_file(tmp_path):
    path = atomic_write_text(tmp_path / "report.md", "old")
    with pytest.raises(Crash), atomic_file(path, "w") as handle:
        handle.write("new, half")
        handle.flush()
        assert path.read_text() == "old"  # mid-write: the target still holds the old content
        raise Crash
    assert path.read_text() == "old" and _names(tmp_path) == ["report.md"]
    with pytest.raises(Crash), atomic_file(tmp_path / "fresh.bin") as handle:
        handle.write(b"partial")
        raise Crash
    assert _names(tmp_path) == ["report.md"]  # no target, no temporary file


def test_a_failing_replace_leaves_the_old_target_and_no_temporary_file(tmp_path, monkeypatch):
    path = atomic_write_text(tmp_path / "t.txt", "old")

    def fail(src, dst):
        raise OSError("cross-device")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="cross-device"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and _names(tmp_path) == ["t.txt"]


# ---------------------------------------------------------------------------------------------- directories


def _fill(directory: Path, payload: str) -> None:
    (directory / "sub").mkdir()
    (directory / "weights.bin").write_text(payload)
    (directory / "sub" / "config.json").write_text(payload)


def test_atomic_dir_creates_and_replaces_a_directory(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".ckpt.tmp-") and not list(tmp.iterdir())
        _fill(tmp, "v1")
    assert (target / "weights.bin").read_text() == "v1" and (target / "sub" / "config.json").is_file()
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    (target / "stale.bin").write_text("from v1 only")
    with atomic_dir(target) as tmp:
        _fill(tmp, "v2")
    assert sorted(p.name for p in target.iterdir()) == ["sub", "weights.bin"]  # replaced, not merged
    assert (target / "weights.bin").read_text() == "v2" and _names(tmp_path) == ["ckpt"]


def test_atomic_dir_publishes_private_files_readable(tmp_path):
    """safetensors and mkstemp write 0600 files; a published checkpoint or reference must be readable (0644)."""
    target = tmp_path / "ref"
    with atomic_dir(target) as tmp:
        _fill(tmp, "v1")
        os.chmod(tmp / "weights.bin", 0o600)
        os.chmod(tmp / "sub", 0o700)
    assert stat.S_IMODE((target / "weights.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((target / "sub" / "config.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((target / "sub").stat().st_mode) == 0o755


def test_an_error_while_filling_keeps_the_old_directory_and_leaves_nothing(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        _fill(tmp, "v1")
    with pytest.raises(Crash), atomic_dir(target) as tmp:
        _fill(tmp, "v2")
        raise Crash
    assert (target / "weights.bin").read_text() == "v1" and _names(tmp_path) == ["ckpt"]
    with pytest.raises(Crash), atomic_dir(tmp_path / "new") as tmp:
        _fill(tmp, "v1")
        raise Crash
    assert _names(tmp_path) == ["ckpt"]


def test_a_failing_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        _fill(tmp, "v1")
    rename = Path.rename

    def rename_new_fails(self, dest):
        if self.name.startswith(".ckpt.tmp-"):
            raise OSError("swap failed")
        return rename(self, dest)
    monkeypatch.setattr(Path, "rename", rename_new_fails)
    with pytest.raises(OSError, match="swap failed"), atomic_dir(target) as tmp:
        _fill(tmp, "v2")
    assert (target / "weights.bin").read_text() == "v1" and _names(tmp_path) == ["ckpt"]


# ---------------------------------------------------------------------------------------------- a full disk


def test_a_full_disk_is_a_disk_full_error_naming_the_target_and_leaves_the_old_content(tmp_path, monkeypatch):
    path = atomic_write_text(tmp_path / "t.txt", "old")

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(DiskFullError, match=f"writing {path} failed: no space left on device") as info:
        atomic_write_text(path, "new")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(path)
    assert path.read_text() == "old" and _names(tmp_path) == ["t.txt"]
    monkeypatch.undo()
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        _fill(tmp, "v1")
    with pytest.raises(DiskFullError, match="disk quota exceeded"), atomic_dir(target) as tmp:
        _fill(tmp, "v2")
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert (target / "weights.bin").read_text() == "v1" and _names(tmp_path) == ["ckpt", "t.txt"]


def test_a_file_size_limit_hit_for_real_leaves_no_partial_file(tmp_path):
    """RLIMIT_FSIZE in a child process (SIGXFSZ ignored): the write itself fails with EFBIG."""
    script = f"""
import json, resource, signal, sys
from puregen_dist.atomic import DiskFullError, atomic_file, atomic_write_text
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
atomic_write_text({str(tmp_path / "t.txt")!r}, "old")
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    with atomic_file({str(tmp_path / "t.txt")!r}) as handle:
        handle.write(b"x" * 100_000)
except DiskFullError as exc:
    print(json.dumps({{"errno": exc.errno, "message": str(exc)}}))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["errno"] == errno.EFBIG and "file too large" in out["message"] and "t.txt" in out["message"]
    assert (tmp_path / "t.txt").read_text() == "old" and _names(tmp_path) == ["t.txt"]
