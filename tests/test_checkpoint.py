"""Checkpoints and run folders: atomic, durable, verified, locked, with clear errors."""

from __future__ import annotations

import json
import os
import pathlib

import pytest
import torch

from moe import checkpoint as ckpt_mod
from moe import config as config_mod
from moe.checkpoint import load_checkpoint, load_model, save_checkpoint
from moe.config import ModelConfig
from moe.model import Transformer
from moe.train import TrainConfig, build_optimizer
from tests.test_train import TINY, state_of

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ checkpoints
def _saved(tmp_path, cfg: ModelConfig = TINY, step: int = 1):
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = build_optimizer(model, TrainConfig())
    out = str(tmp_path / "ckpt")
    save_checkpoint(out, model, opt, step, {}, {})
    return out, model, opt


def test_crash_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    out, model, opt = _saved(tmp_path)
    before = state_of(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real = ckpt_mod._write_durable

    def crash(path, data):  # half a file, then the power goes
        if os.path.basename(path) != "state.pt":
            return real(path, data)
        with open(path, "wb") as f:
            f.write(data[:10])
        raise OSError("simulated crash while writing state.pt")

    monkeypatch.setattr(ckpt_mod, "_write_durable", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(out, model, opt, 2, {}, {})
    monkeypatch.undo()
    assert not [e for e in os.listdir(out) if e.startswith(".tmp")]  # the temp folder is cleaned up
    loaded, ckpt = load_model(out)
    assert ckpt.step == 1
    for k, v in state_of(loaded).items():
        assert torch.equal(v, before[k]), k


def test_crash_before_latest_is_updated(tmp_path, monkeypatch):
    out, model, opt = _saved(tmp_path)
    real = ckpt_mod.atomic_write_text

    def crash_on_latest(path, text):
        if os.path.basename(path) == "LATEST":
            raise OSError("simulated crash before LATEST")
        real(path, text)

    monkeypatch.setattr(ckpt_mod, "atomic_write_text", crash_on_latest)
    with pytest.raises(OSError):
        save_checkpoint(out, model, opt, 2, {}, {})
    monkeypatch.undo()
    assert load_checkpoint(out).step == 1  # the complete but unnamed ckpt-2 is ignored
    save_checkpoint(out, model, opt, 2, {}, {})  # and replaced on the next save
    assert load_checkpoint(out).step == 2
    assert sorted(e for e in os.listdir(out) if e.startswith("ckpt-")) == ["ckpt-00000002"]


def test_corrupt_or_missing_files_are_named(tmp_path):
    out, _, _ = _saved(tmp_path)
    folder = os.path.join(out, "ckpt-00000001")
    weights = os.path.join(folder, "model.safetensors")
    raw = bytearray(pathlib.Path(weights).read_bytes())
    raw[-5] ^= 0xFF
    pathlib.Path(weights).write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        load_checkpoint(out)
    os.unlink(weights)
    with pytest.raises(FileNotFoundError, match="checkpoint file missing: .*model.safetensors"):
        load_checkpoint(out)
    with open(os.path.join(out, "LATEST"), "w") as f:
        f.write("ckpt-00000099\n")
    with pytest.raises(FileNotFoundError, match="names ckpt-00000099, which is missing"):
        load_checkpoint(out)


def test_edited_config_that_no_longer_matches_the_weights(tmp_path):
    out, _, _ = _saved(tmp_path)
    folder = os.path.join(out, "ckpt-00000001")
    cfg_path = os.path.join(folder, "config.json")
    TINY.replace(n_routed_experts=8, n_expert_groups=2).save(cfg_path)
    manifest_path = pathlib.Path(folder, "manifest.json")
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["config.json"] = {"bytes": os.path.getsize(cfg_path), "sha256": ckpt_mod._sha256(cfg_path)}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"does not match the model config: shape mismatch .*router.weight"):
        load_model(out)


def test_tied_embeddings_and_router_bias_survive_a_round_trip(tmp_path):
    cfg = TINY.replace(tie_embeddings=True)
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "bias", None) is not None and m.__class__.__name__ == "Router":
                m.bias.copy_(torch.randn_like(m.bias))
    opt = build_optimizer(model, TrainConfig())
    out = str(tmp_path / "tied")
    save_checkpoint(out, model, opt, 1, {}, {})
    loaded, ckpt = load_model(out)
    assert ckpt.aliases  # stored once
    assert loaded.head.weight is loaded.embed.weight
    for k, v in state_of(model).items():
        assert torch.equal(v, state_of(loaded)[k]), k
    assert any("router.bias" in k for k in ckpt.tensors)


# ------------------------------------------------------------------------------ manifest and LATEST
def _edit_manifest(out: str, edit) -> None:
    path = pathlib.Path(out, "ckpt-00000001", "manifest.json")
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["files"]["state.pt"].pop("sha256"), r"entry 'state.pt' needs 'bytes' .* and 'sha256'"),
    (lambda m: m["files"].clear(), r"does not list \['model.safetensors', 'config.json', 'train.json', 'state.pt'\]"),
    (lambda m: m["files"].pop("model.safetensors"), r"does not list \['model.safetensors'\]"),
    (lambda m: m.pop("files"), "no 'files' table"),
    (lambda m: m["files"].update({"../escape": {"bytes": 1, "sha256": "x"}}), "not a file name inside"),
    (lambda m: m["files"]["config.json"].update(bytes="12"), r"entry 'config.json' needs 'bytes' \(an integer\)"),
])
def test_a_manifest_must_list_every_file_with_size_and_hash(tmp_path, edit, message):
    out, _, _ = _saved(tmp_path)
    _edit_manifest(out, edit)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(out)


def test_latest_must_name_a_checkpoint_folder_of_this_run(tmp_path):
    other, _, _ = _saved(tmp_path / "other")
    out, _, _ = _saved(tmp_path / "mine", step=2)
    latest = pathlib.Path(out, "LATEST")
    for text in (os.path.relpath(os.path.join(other, "ckpt-00000001"), out), "../other/ckpt/ckpt-00000001",
                 "manifest.json", "ckpt-1", ""):
        latest.write_text(text + "\n")
        with pytest.raises(ValueError, match="LATEST is corrupt: it names"):
            load_checkpoint(out)
    latest.write_text("ckpt-00000002\n")
    assert load_checkpoint(out).step == 2


# ------------------------------------------------------------------------------ durability
def test_files_and_folders_are_fsynced_before_renames_and_deletes(tmp_path, monkeypatch):
    out, model, opt = _saved(tmp_path)
    events: list[tuple[str, str]] = []
    real_fsync, real_dir, real_replace, real_rmtree = (ckpt_mod.os.fsync, ckpt_mod.fsync_dir, ckpt_mod.os.replace,
                                                       ckpt_mod.shutil.rmtree)
    paths: dict[int, str] = {}
    real_open = open

    def tracking_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        paths[f.fileno()] = os.path.basename(str(path))
        return f

    monkeypatch.setattr("builtins.open", tracking_open)
    monkeypatch.setattr(ckpt_mod.os, "fsync", lambda fd: (events.append(("fsync", paths.get(fd, "?"))),
                                                          real_fsync(fd))[1])
    track_dir = lambda d: (events.append(("fsync_dir", os.path.basename(d))), real_dir(d))[1]
    monkeypatch.setattr(ckpt_mod, "fsync_dir", track_dir)
    monkeypatch.setattr(config_mod, "fsync_dir", track_dir)  # atomic_write_text (LATEST) uses it
    monkeypatch.setattr(ckpt_mod.os, "replace", lambda a, b: (events.append(("replace", os.path.basename(b))),
                                                              real_replace(a, b))[1])
    monkeypatch.setattr(ckpt_mod.shutil, "rmtree", lambda p, **kw: (events.append(("rmtree", os.path.basename(p))),
                                                                    real_rmtree(p, **kw))[1])
    save_checkpoint(out, model, opt, 2, {}, {})
    monkeypatch.undo()
    rename = events.index(("replace", "ckpt-00000002"))
    for f in (*ckpt_mod.REQUIRED_FILES, "manifest.json"):
        assert events.index(("fsync", f)) < rename, f
    assert any(e[0] == "fsync_dir" and e[1].startswith(".tmp-ckpt-") for e in events[:rename])
    assert ("fsync_dir", "ckpt") in events[rename:]
    delete = events.index(("rmtree", "ckpt-00000001"))
    latest = events.index(("replace", "LATEST"))
    assert rename < latest < delete
    assert ("fsync_dir", "ckpt") in events[latest:delete]


def test_a_full_disk_names_the_path_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    out, model, opt = _saved(tmp_path)
    real = ckpt_mod._write_durable

    def full(path, data):
        if os.path.basename(path) == "state.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as f.write reports it
        real(path, data)

    monkeypatch.setattr(ckpt_mod, "_write_durable", full)
    with pytest.raises(OSError) as e:
        save_checkpoint(out, model, opt, 2, {}, {})
    monkeypatch.undo()
    assert e.value.errno == errno.ENOSPC and e.value.filename.endswith("state.pt")
    assert "No space left on device" in e.value.strerror and "cannot write checkpoint" in e.value.strerror
    assert load_checkpoint(out).step == 1
    assert not [p for p in os.listdir(out) if p.startswith(".tmp")]


def _weights_only(out: str, source: str) -> None:
    from moe.interop.hf import our_specs

    sd = Transformer(TINY).state_dict()
    specs = our_specs(TINY, torch.float32)
    ckpt_mod.save_weights_checkpoint(out, TINY, specs, lambda write: [write(n, None, sd[n]) for n in specs], {},
                                     {"source": source})


def test_overwriting_converted_weights_keeps_them_until_the_new_ones_are_in_place(tmp_path, monkeypatch):
    """A converted checkpoint has one name (step 0): replacing it must not delete it first."""
    out = str(tmp_path / "run")
    _weights_only(out, "first")
    real = os.replace

    def failing(src, dst):
        if os.path.basename(src).startswith(ckpt_mod.TMP_PREFIX):
            raise OSError(5, "simulated failure")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="simulated failure"):
        _weights_only(out, "second")
    monkeypatch.undo()
    assert load_checkpoint(out).train_config["source"] == "first"
    _weights_only(out, "second")
    assert load_checkpoint(out).train_config["source"] == "second"
    assert sorted(os.listdir(out)) == ["LATEST", "ckpt-00000000"]  # nothing set aside is left


def test_replace_dir_swaps_folders_and_puts_the_old_back_on_failure(tmp_path, monkeypatch):
    src, dst = tmp_path / "new", tmp_path / "dst"
    for folder, text in ((src, "new"), (dst, "old")):
        folder.mkdir()
        (folder / "f").write_text(text)
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError(5, "no")) if a == str(src)
                        else real(a, b))
    with pytest.raises(OSError):
        config_mod.replace_dir(src, dst)
    monkeypatch.undo()
    assert (dst / "f").read_text() == "old" and (src / "f").read_text() == "new"
    config_mod.replace_dir(src, dst)
    assert (dst / "f").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["dst"]


@pytest.mark.parametrize("kind", ["file", "link"])
def test_replace_dir_over_a_file_or_a_link_leaves_nothing_aside(tmp_path, kind):
    src, dst = tmp_path / "new", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_text("new")
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep").write_text("kept")
    if kind == "file":
        dst.write_text("old")
    else:
        dst.symlink_to(target)
    config_mod.replace_dir(src, dst)
    assert (dst / "f").read_text() == "new" and not dst.is_symlink()
    assert (target / "keep").read_text() == "kept"  # what the link pointed to is not deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "target"]


def test_a_checkpoint_left_aside_by_a_kill_is_put_back_or_removed(tmp_path):
    """A kill between replace_dir's two renames leaves LATEST naming a missing folder and the old copy aside:
    loading says where it is, the next train puts it back, and --overwrite removes leftovers."""
    out = str(tmp_path / "run")
    _weights_only(out, "first")
    aside = os.path.join(out, config_mod.ASIDE_PREFIX + "ckpt-00000000-0123abcd")
    os.rename(os.path.join(out, "ckpt-00000000"), aside)
    with pytest.raises(FileNotFoundError, match=r"left the old copy as \.old-ckpt-00000000-0123abcd"):
        load_checkpoint(out)
    assert ckpt_mod.remove_stale_tmp(out) == []
    assert load_checkpoint(out).train_config["source"] == "first"
    os.makedirs(aside)  # a leftover beside a complete checkpoint: stale
    assert ckpt_mod.remove_stale_tmp(out) == [os.path.basename(aside)] and not os.path.exists(aside)
    os.makedirs(aside)
    ckpt_mod.clear_run(out)
    assert os.listdir(out) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc")
def test_a_failing_streaming_writer_closes_its_file(tmp_path, monkeypatch):
    import errno

    def full(fd, n):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "ftruncate", full)
    before = len(os.listdir("/proc/self/fd"))
    for i in range(3):
        with pytest.raises(OSError):
            ckpt_mod.StreamingSafetensors(str(tmp_path / f"m{i}.safetensors"), {"w": ((4, 4), torch.float32)})
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_real_full_disk(tmp_path):
    """On a 64 KiB tmpfs (needs root and mount; skipped elsewhere) the real error comes through."""
    import errno
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        torch.manual_seed(0)
        model = Transformer(TINY)  # 36k parameters: 145 KB of weights, more than the disk holds
        with pytest.raises(OSError) as e:
            save_checkpoint(str(mnt / "run"), model, build_optimizer(model, TrainConfig()), 1, {}, {})
        assert e.value.errno == errno.ENOSPC and str(mnt) in e.value.filename
        assert not [p for p in os.listdir(mnt / "run") if p.startswith(".tmp")]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ------------------------------------------------------------------------------ the run folder
def test_out_that_cannot_be_a_folder_is_refused_before_anything_happens(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        ckpt_mod.check_out_dir(str(a_file))
    with pytest.raises(ValueError, match=r"cannot be created: .*file.txt is a file"):
        ckpt_mod.check_out_dir(str(a_file / "run"))
    ckpt_mod.check_out_dir(str(tmp_path / "new" / "deeper"))  # creatable: fine, and nothing is created
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(not os.path.isdir("/sys/kernel"), reason="uses Linux's sysfs as a folder nobody may write")
def test_an_unwritable_out_is_refused():
    with pytest.raises(ValueError, match="is not writable: cannot create files in /sys"):
        ckpt_mod.check_out_dir("/sys/moe-run")


def test_stale_temp_folders_are_removed(tmp_path):
    out, _, _ = _saved(tmp_path)
    stale = pathlib.Path(out, ".tmp-ckpt-killed")
    (stale / "sub").mkdir(parents=True)
    (stale / "state.pt").write_bytes(b"half")
    keep = pathlib.Path(out, ".tmp-not-a-checkpoint")
    keep.write_text("x")
    assert ckpt_mod.remove_stale_tmp(out) == [".tmp-ckpt-killed"]
    assert not stale.exists() and keep.exists() and load_checkpoint(out).step == 1


def test_the_lock_refuses_a_second_writer_and_names_the_first(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with ckpt_mod.RunLock(str(out)):
        assert (out / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(ValueError, match=rf"being written by another train process \(pid {os.getpid()}\)"), \
                ckpt_mod.RunLock(str(out)):
            pass
    with ckpt_mod.RunLock(str(out)):  # released on exit
        pass
