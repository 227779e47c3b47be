"""Atomic writes: whole or nothing, and files/directories others can read (not tempfile's 0600)."""

import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from mlsae_lens.atomic import atomic_file, atomic_save_file, atomic_write_json, atomic_write_text, staging_dir


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_get_the_umask_mode_not_tempfiles_0600(tmp_path, umask_022) -> None:
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic_write_text(tmp_path / "b.html", "<p>ü</p>")
    atomic_save_file({"w": torch.ones(2)}, tmp_path / "c.safetensors")
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}
    assert (tmp_path / "b.html").read_text(encoding="utf-8") == "<p>ü</p>"
    assert torch.equal(load_file(tmp_path / "c.safetensors")["w"], torch.ones(2))
    for name in ("a.json", "b.html", "c.safetensors"):
        assert mode(tmp_path / name) == 0o644, name
    with staging_dir(tmp_path, ".tmp-") as tmp:
        assert mode(tmp) == 0o755
        os.replace(tmp, tmp_path / "renamed")
    assert mode(tmp_path / "renamed") == 0o755


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path) -> None:
    target = tmp_path / "state.json"
    atomic_write_json(target, {"version": 1})
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text('{"version": 2, "trunc')
        raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
