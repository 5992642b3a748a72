"""Runs that cannot corrupt each other, checkpoints that cannot load damaged, stops that are safe at any moment.

* One writer per output: a second training in the same directory is refused (two real processes), and so
  is every other writing command while the lock is held; a dead holder's lock is taken over.
* The ``COMPLETE`` marker records a sha256 per file: bit rot (4000 bytes flipped, same size) in any weight
  file is refused by every command that reads checkpoints, with one ``error:`` line and nothing written.
* SIGTERM / SIGINT at start-up, mid-step and mid-save all end with exit code 3 and a consistent run.
* Frictions: renamed checkpoint directories load, files respect the umask, resume reports changed options,
  unwritable outputs are refused before any work.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentlm import cli, lock
from latentlm.checkpoint import Checkpoint, checkpoint_files, list_checkpoints, mark_complete
from latentlm.config import ConfigError, SigmaVAEConfig, TokenizerTrainConfig
from latentlm.io import current_umask, write_safetensors
from latentlm.signals import EXIT_ABORTED, EXIT_INTERRUPTED
from latentlm.training.model import train
from latentlm.training.tokenizer import train_tokenizer
from test_sweep import digits_checkpoint
from train_helpers import (
    assert_states_equal,
    cli_args,
    make_image_folder,
    signal_at_pause,
    subprocess_env,
    tiny_config,
    wait_for,
)

HELPER = str(Path(__file__).with_name("hardening_helpers.py"))
TINY_CONV = dict(latent_channels=4, base_channels=8, channel_mult=(1, 2))


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """``latentlm ARGV`` in this process: (exit code, stderr). A traceback would escape as an exception."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with (size, mtime): what a refused command must leave alone (logs and
    lock files aside)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and p.name not in ("train.log", lock.LOCK_FILE) and not p.name.endswith(".lock")}


def flip_bytes(file: Path, count: int = 4000) -> None:
    """Overwrite ``count`` bytes in the middle of ``file`` with 0xFF: same size, different contents."""
    size = file.stat().st_size
    assert size > 2 * count, f"{file} is too small to flip {count} bytes"
    with open(file, "r+b") as f:
        f.seek(size // 2 - count // 2)
        f.write(b"\xff" * count)


def start_helper(mode: str, out: Path, data: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, HELPER, mode, str(out), str(data), *extra], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"))


# ---------------------------------------------------------------------------------------------
# The run lock
# ---------------------------------------------------------------------------------------------


def test_a_second_training_in_the_same_directory_is_refused(data, tmp_path):
    """Bug 1: two trainings in one output directory interleaved their checkpoint files. Two real processes."""
    out = tmp_path / "out"
    out.mkdir()
    first = start_helper("step", out, data)
    try:
        wait_for(out / "ready", first)  # the first run is inside step 3
        before = snapshot(out / "run")
        argv = cli_args(out / "run", data, "--resume", "auto")
        second = subprocess.run([sys.executable, "-m", "latentlm.cli", *argv], env=subprocess_env(),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert "Traceback" not in second.stderr
        lines = error_lines(second.stderr)
        assert lines == [f"error: {out / 'run'} is being written by pid {first.pid} on host {socket.gethostname()} "
                         f"(since {json.loads((out / 'run' / '.lock').read_text())['since']}); wait for it or use "
                         "another --output-dir"]
        assert snapshot(out / "run") == before  # the refused run wrote nothing
        (out / "go").touch()
        output, _ = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 0, output
    saved = list_checkpoints(out / "run")
    assert [(e.step, e.problem) for e in saved] == [(2, None), (4, None), (5, None)]
    for entry in saved:  # every file of every checkpoint is the one run's: hashes match, step agrees
        ckpt = Checkpoint(entry.path)
        ckpt.verify()
        assert ckpt.step == entry.step
    assert (out / "run" / ".lock").read_text() == ""  # released: the next run may start


@pytest.mark.parametrize("command", ["train-tokenizer", "cache-latents", "sample-many", "sweep"])
def test_every_writing_command_is_refused_while_its_output_is_locked(command, data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = {
        "train-tokenizer": ["train-tokenizer", "--output-dir", out, "--max-steps", "1", "--no-progress"],
        "cache-latents": ["cache-latents", "--out", out, "--data.path", data, "--data.image-size", "8",
                          "--device", "cpu", "--no-progress"],
        "sample-many": ["sample-many", "--checkpoint", "CKPT", "--out", out / "s.npz", "--device", "cpu"],
        "sweep": ["sweep", "--checkpoints", "CKPT", "--out", out, "--device", "cpu"],
    }[command]
    if "CKPT" in argv:  # a digits checkpoint: the sweep scores it without a reference file
        argv[argv.index("CKPT")] = digits_checkpoint(tmp_path / "run")
    target = out / "s.npz" if command == "sample-many" else out
    with lock.RunLock(target, directory=command != "sample-many"):
        code, err = run_main(argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert len(error_lines(err)) == 1 and f"is being written by pid {os.getpid()}" in err
    assert {p.name for p in out.iterdir()} <= {".lock", ".s.npz.lock"}  # nothing but the lock file


@pytest.mark.distributed
def test_a_locked_directory_refuses_every_process_of_a_launch(data, tmp_path):
    """One lock per run: the first process takes it, and every process stops with the same one line."""
    run_dir = tmp_path / "run"
    with lock.RunLock(run_dir):
        launch = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                                 "2", "-m", "latentlm.cli", *cli_args(run_dir, data)], env=subprocess_env(),
                                capture_output=True, text=True, timeout=300)
    output = launch.stdout + launch.stderr
    assert launch.returncode != 0
    refusals = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(refusals) == 2 and len(set(refusals)) == 1, output  # both processes, the same line
    assert f"is being written by pid {os.getpid()} on host {socket.gethostname()}" in refusals[0]
    assert {p.name for p in run_dir.iterdir()} == {".lock"}


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (tmp_path / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "then"}))
    with lock.RunLock(tmp_path):
        holder = json.loads((tmp_path / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    assert f"taking over the stale lock of pid {pid} on host {socket.gethostname()} (since then)" in caplog.text


ORPHAN = """
import os, sys, time
from latentlm.lock import RunLock
RunLock(sys.argv[1]).acquire()
if os.fork() == 0:  # like a DataLoader worker: shares the locked descriptor
    time.sleep(4)
    os._exit(0)
os._exit(0)  # dies without releasing, as under kill -9
"""


def test_a_killed_runs_leftover_children_are_waited_for(tmp_path, monkeypatch, caplog):
    subprocess.run([sys.executable, "-c", ORPHAN, str(tmp_path)], env=subprocess_env(), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    dead = json.loads((tmp_path / ".lock").read_text())["pid"]
    monkeypatch.setattr(lock, "ORPHAN_WAIT_S", 0.0)
    with pytest.raises(lock.RunLocked, match=f"was being written by pid {dead} .* which has died, but processes it "
                                             "started still hold its lock"):
        lock.RunLock(tmp_path).acquire()
    monkeypatch.setattr(lock, "ORPHAN_WAIT_S", 60.0)
    with lock.RunLock(tmp_path):  # waits for the child to exit
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"taking over the stale lock of pid {dead}" in caplog.text


def test_without_flock_the_record_decides(tmp_path, monkeypatch, caplog):
    """Filesystems without flock: a live holder (here this very test process, seen from a 'new' lock) refuses,
    a dead one on this host is taken over."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    parent = os.getppid()
    (tmp_path / ".lock").write_text(json.dumps({"pid": parent, "host": socket.gethostname(), "since": "x"}))
    with pytest.raises(lock.RunLocked, match=f"is being written by pid {parent} on host"):
        lock.RunLock(tmp_path).acquire()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    held = lock.RunLock(tmp_path)
    held.acquire()
    held.release()
    assert "taking over the stale lock of pid 4206649" in caplog.text


def test_unwritable_output_directory_is_one_error_line(tmp_path, capsys):
    (tmp_path / "file").write_text("not a directory")
    code, err = run_main(["train-tokenizer", "--output-dir", tmp_path / "file" / "run", "--no-progress"], capsys)
    assert code == 2 and error_lines(err) == [f"error: --output-dir {tmp_path / 'file' / 'run'}: cannot write to "
                                              f"{tmp_path / 'file' / 'run'} (Not a directory); choose a writable "
                                              "directory"]


# ---------------------------------------------------------------------------------------------
# The COMPLETE marker: sha256 of every file, verified on read
# ---------------------------------------------------------------------------------------------


def test_marker_records_sha256_of_every_file_subfolders_included(data, tmp_path):
    path = train(tiny_config(tmp_path / "run", data, max_steps=1)).checkpoint
    (path / "shards").mkdir()
    (path / "shards" / "part-0.bin").write_bytes(b"x" * 100)  # e.g. a sharded optimizer's files
    mark_complete(path, 1, 1)
    marker = json.loads((path / "COMPLETE").read_text())
    assert sorted(marker["files"]) == checkpoint_files(path) and "shards/part-0.bin" in marker["files"]
    assert marker["files"]["shards/part-0.bin"] == {
        "size": 100, "sha256": "09ecb6ebc8bcefc733f6f2ec44f791abeed6a99edf0cc31519637898aebd52d8"}
    Checkpoint(path).verify()
    (path / "shards" / "part-0.bin").write_bytes(b"y" * 100)
    with pytest.raises(ConfigError, match=r"part-0.bin is corrupt \(sha256 differs from the COMPLETE marker\)"):
        Checkpoint(path).verify()


def test_old_markers_with_sizes_only_still_load(data, tmp_path):
    path = train(tiny_config(tmp_path / "run", data, max_steps=1)).checkpoint
    marker = json.loads((path / "COMPLETE").read_text())
    marker["files"] = {name: entry["size"] for name, entry in marker["files"].items()}
    (path / "COMPLETE").write_text(json.dumps(marker))
    ckpt = Checkpoint(path)
    ckpt.verify()
    assert set(ckpt.ema) == set(load_file(path / "ema.safetensors"))


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    """A model run and a σ-VAE run, each with checkpoints at steps 1 and 2."""
    root = tmp_path_factory.mktemp("runs")
    train(tiny_config(root / "model", data, max_steps=2, checkpoint_every=1))
    train_tokenizer(TokenizerTrainConfig(output_dir=str(root / "vae"), vae=SigmaVAEConfig(**TINY_CONV), max_steps=2,
                                         batch_size=16, warmup_steps=1, checkpoint_every=1, log_every=1,
                                         norm_images=32, progress=False))
    return {"model": root / "model", "vae": root / "vae"}


def _reader_argv(command: str, run: Path, out: Path, data: Path) -> list:
    sampling = ["--sampler.num-steps", "2", "--device", "cpu"]
    return {
        "sample": ["sample", "--checkpoint", run, "--out", out / "grid.png", "--classes", "0", "--per-class", "1",
                   *sampling],
        "sample --no-ema": ["sample", "--checkpoint", run, "--out", out / "grid.png", "--classes", "0",
                            "--per-class", "1", "--no-ema", *sampling],
        "sample-many": ["sample-many", "--checkpoint", run, "--out", out / "s.npz", "--per-class", "1",
                        "--no-progress", *sampling],
        "evaluate": ["evaluate", "--checkpoint", run, "--out", out / "s.npz", "--per-class", "1", "--no-progress",
                     *sampling],
        "sweep": ["sweep", "--checkpoints", run, "--out", out / "sweep", "--num-steps", "2", "--per-class", "1",
                  "--cfg-scales", "1.0", "--device", "cpu", "--no-progress"],
        "train --resume": cli_args(run, data, "--resume", "auto", "--max-steps", "3"),
        "train-tokenizer --resume": ["train-tokenizer", "--output-dir", run, "--resume", "auto", "--max-steps", "3",
                                     "--vae.latent-channels", "4", "--vae.base-channels", "8",
                                     "--vae.channel-mult", "1", "2", "--batch-size", "16", "--warmup-steps", "1",
                                     "--norm-images", "32", "--no-progress"],
    }[command]


BIT_ROT_CASES = [  # (command, the run it reads, a weight file it reads)
    ("sample", "model", "ema.safetensors"), ("sample --no-ema", "model", "model.safetensors"),
    ("sample-many", "model", "ema.safetensors"), ("evaluate", "model", "ema.safetensors"),
    ("sweep", "model", "ema.safetensors"),
    *[("train --resume", "model", f) for f in ("model.safetensors", "ema.safetensors", "optimizer.pt")],
    *[("train-tokenizer --resume", "vae", f) for f in ("model.safetensors", "ema.safetensors", "optimizer.pt")],
]


@pytest.mark.parametrize(("command", "kind", "name"), BIT_ROT_CASES)
def test_bit_rot_in_a_weight_file_is_refused_by_every_reader(command, kind, name, runs, data, tmp_path, capsys):
    """Bug 2: 4000 bytes of ema.safetensors set to 0xFF (same size) gave an all-black grid with exit 0."""
    run = tmp_path / kind
    shutil.copytree(runs[kind], run)
    newest = run / "checkpoints" / "step-00000002"
    flip_bytes(newest / name)
    before = snapshot(tmp_path)
    code, err = run_main(_reader_argv(command, run, tmp_path / "out", data), capsys)
    assert code == 2 and "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].endswith(f"{newest / name} is corrupt (sha256 differs from the COMPLETE marker); resume from an "
                             f"older checkpoint: {run / 'checkpoints' / 'step-00000001'}")
    assert snapshot(tmp_path) == before  # nothing written, nothing damaged
    out = tmp_path / "out"
    assert not out.exists() or {p.name for p in out.rglob("*") if p.is_file()} <= {".s.npz.lock", ".lock"}


def test_without_hashes_non_finite_weights_are_still_named(runs, tmp_path, capsys, monkeypatch):
    """LATENTLM_VERIFY=size skips the hashes; 0xFF bytes are NaN in fp32, and the finite check names the tensor."""
    run = tmp_path / "model"
    shutil.copytree(runs["model"], run)
    ema = run / "checkpoints" / "step-00000002" / "ema.safetensors"
    weights = load_file(ema)
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = float("nan")
    save_file(weights, str(ema), metadata={"format": "pt"})  # same size: only the hash or the values tell
    monkeypatch.setenv("LATENTLM_VERIFY", "size")
    code, err = run_main(_reader_argv("sample", run, tmp_path / "out", run), capsys)
    assert code == 2 and error_lines(err) == [
        f"error: {ema} is corrupt (tensor {name!r} has NaN/inf values; checkpoints never hold such weights); resume "
        f"from an older checkpoint: {run / 'checkpoints' / 'step-00000001'}"]
    monkeypatch.setenv("LATENTLM_VERIFY", "sizes")
    code, err = run_main(_reader_argv("sample", run, tmp_path / "out", run), capsys)
    assert code == 2 and "LATENTLM_VERIFY='sizes': use 'hash'" in err


def test_a_renamed_complete_checkpoint_directory_is_accepted(runs, data, tmp_path, capsys):
    """Friction 5: `best/` (a copied step directory) was refused for its name."""
    best = tmp_path / "best"
    shutil.copytree(runs["model"] / "checkpoints" / "step-00000002", best)
    code, err = run_main(_reader_argv("sample", best, tmp_path / "out", data), capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "grid.png").is_file()
    resumed = train(tiny_config(tmp_path / "resumed", data, max_steps=3, resume=str(best)))
    assert resumed.step == 3 and resumed.losses[:2] == Checkpoint(best).state["losses"]


# ---------------------------------------------------------------------------------------------
# Stop signals: start-up, mid-step, mid-save
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("moment", "sig"), [("import", signal.SIGTERM), ("startup", signal.SIGTERM),
                                           ("startup", signal.SIGINT)])
def test_stop_signal_during_start_up_exits_3_with_nothing_saved(moment, sig, data, tmp_path):
    """Bug 10: SIGTERM while the normalization was fitted exited 143 (missed by the requeue on exit 3)."""
    out = tmp_path / "out"
    out.mkdir()
    proc = start_helper(moment, out, data)
    try:
        wait_for(out / "ready", proc)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, output
    assert "Traceback" not in output
    assert f"stopped by {signal.Signals(sig).name} before the first step" in output
    assert list_checkpoints(out / "run") == []


def test_ctrl_c_mid_step_saves_and_exits_3_and_a_second_one_aborts(data, tmp_path):
    """Bug 10: Ctrl-C gave a traceback and saved nothing."""
    out = tmp_path / "once"
    out.mkdir()
    proc = start_helper("step", out, data)
    output = signal_at_pause(proc, out, signal.SIGINT)  # inside step 3
    assert proc.returncode == EXIT_INTERRUPTED, output
    assert "stopped by SIGINT at step 3" in output and "Traceback" not in output
    assert [(e.step, e.problem) for e in list_checkpoints(out / "run")] == [(2, None), (3, None)]

    twice = tmp_path / "twice"
    twice.mkdir()
    proc = start_helper("step", twice, data)
    try:
        wait_for(twice / "ready", proc)
        proc.send_signal(signal.SIGINT)
        seen = ""
        while "Ctrl-C again aborts" not in seen:  # the first Ctrl-C was handled before the second is sent
            line = proc.stdout.readline()
            assert line, f"exited before handling the first Ctrl-C:\n{seen}"
            seen += line
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
        output = seen + output
    finally:
        proc.kill()
    assert proc.returncode == EXIT_ABORTED, output
    assert "error: interrupted (Ctrl-C) without saving" in output and "Traceback" not in output
    assert [(e.step, e.problem) for e in list_checkpoints(twice / "run")] == [(2, None)]


def test_sigterm_mid_save_stops_right_after_it_and_resumes_exactly(data, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = start_helper("save", out, data)
    output = signal_at_pause(proc, out, signal.SIGTERM)  # writing the step-2 checkpoint
    assert proc.returncode == EXIT_INTERRUPTED, output
    assert "stopped by SIGTERM at step 2" in output
    assert [(e.step, e.problem) for e in list_checkpoints(out / "run")] == [(2, None)]  # no extra step
    resumed = train(tiny_config(out / "run", data, max_steps=5, checkpoint_every=2, resume="auto"))
    straight = train(tiny_config(tmp_path / "straight", data, max_steps=5, checkpoint_every=2))
    assert resumed.losses == straight.losses
    assert_states_equal(resumed.model.state_dict(), straight.model.state_dict(), "model")
    assert_states_equal(resumed.ema.state_dict(), straight.ema.state_dict(), "ema")


# ---------------------------------------------------------------------------------------------
# Frictions: umask, resume with changed options, unwritable outputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_written_files_respect_the_umask(mask, tmp_path):
    """Friction 6: safetensors files came out 0600 whatever the umask."""
    previous = os.umask(mask)
    try:
        assert current_umask() == mask
        write_safetensors(tmp_path / "w.safetensors", {"x": torch.zeros(2)})
    finally:
        os.umask(previous)
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~mask


def test_resume_logs_changed_options_and_whether_it_stays_exact(runs, data, tmp_path, caplog):
    """Friction 7: a changed --seed or --lr on resume went unmentioned."""
    run = tmp_path / "model"
    shutil.copytree(runs["model"], run)
    caplog.set_level("WARNING")
    train(tiny_config(run, data, max_steps=3, resume="auto", log_every=1, keep_last=5, checkpoint_every=1))
    assert "with options that differ from its run: keep_last: 3 -> 5; log_every: 100 -> 1; max_steps: 2 -> 3; " \
        f"output_dir: '{runs['model']}' -> '{run}'; resume: None -> 'auto'; the resumed run no longer repeats the " \
        "original one exactly (because of max_steps)" in caplog.text
    caplog.clear()
    train(tiny_config(run, data, max_steps=3, resume="auto", log_every=1, keep_last=5, checkpoint_every=1,
                      stop_at_step=3))
    assert "with options that differ from its run: stop_at_step: None -> 3; none of them changes what is computed: " \
        "the resume stays exact" in caplog.text


def test_sample_refuses_an_unwritable_output_before_generating(runs, tmp_path, capsys, monkeypatch):
    """Bug 8: `sample` computed every image before failing on an unwritable output folder."""
    from latentlm.commands import sample

    def forbidden(*args, **kwargs):
        raise AssertionError("generated before checking the output folder")

    monkeypatch.setattr(sample, "sample_grid", forbidden)
    monkeypatch.setattr(sample, "load_trained", forbidden)
    (tmp_path / "file").write_text("")
    code, err = run_main(["sample", "--checkpoint", runs["model"], "--out", tmp_path / "file" / "grid.png"], capsys)
    assert code == 2 and error_lines(err) == [f"error: --out: cannot write to {tmp_path / 'file'} (File exists); "
                                              "choose a writable location"]
