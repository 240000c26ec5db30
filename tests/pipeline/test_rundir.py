"""Run folders (diffmath.rundir): --overwrite checks every argument first and deletes only what
diffmath wrote (its .diffmath-run marker lists it), one writer per folder (an exclusive lock,
tested with a second process), and the temp files of killed writes are removed on --resume and
--overwrite, only in a marked folder."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from diffmath.cli import main, run_demo
from diffmath.pipeline.rundir import RunError, claim_output, clear_run, lock_folder, open_run

torch.set_num_threads(1)

GMM = [
    "--data",
    "gmm",
    "--steps",
    "2",
    "--batch-size",
    "16",
    "--channels",
    "4",
    "--timesteps",
    "50",
    "--save-every",
    "2",
    "--no-progress",
]


def _err(capsys):
    return capsys.readouterr().err


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- --overwrite
def test_overwrite_checks_every_argument_first_and_never_deletes_a_folder_it_did_not_write(tmp_path, capsys):
    # issue 11, 6.1: `mkdir u; echo '{"my":1}' > u/config.json; echo x > u/report.md;
    # diffmath train --data /nonexistent --out u --overwrite` deleted both files, then exited 2
    u = tmp_path / "u"
    u.mkdir()
    (u / "config.json").write_text('{"my":1}\n')
    (u / "report.md").write_text("x\n")
    before = _snapshot(u)
    assert main(["train", "--data", str(tmp_path / "nonexistent"), "--out", str(u), "--overwrite"] + GMM[2:]) == 2
    assert "no such file or folder" in _err(capsys)
    assert _snapshot(u) == before and sorted(os.listdir(u)) == ["config.json", "report.md"]
    # valid arguments, but the folder has no marker: refused, nothing deleted or added
    assert main(["train", "--out", str(u), "--overwrite"] + GMM) == 2
    err = _err(capsys)
    assert "is not a folder that diffmath wrote" in err and "nothing in it is deleted" in err
    assert sorted(os.listdir(u)) == ["config.json", "report.md"] and _snapshot(u) == before
    # the demo's --overwrite too (refused before it trains)
    with pytest.raises(RunError, match="not a folder that diffmath wrote"):
        run_demo(u, overwrite=True, progress=False, device="cpu")
    assert sorted(os.listdir(u)) == ["config.json", "report.md"] and _snapshot(u) == before
    # a bad model flag is refused before the folder is touched, too
    assert (
        main(
            [
                "train",
                "--out",
                str(u),
                "--overwrite",
                "--data",
                "digits",
                "--attention-resolutions",
                "3",
                "--steps",
                "1",
                "--no-progress",
            ]
        )
        == 2
    )
    assert _snapshot(u) == before


def test_overwrite_deletes_exactly_the_files_the_marker_lists(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run)] + GMM) == 0
    assert main(["sample", "--run", str(run), "--num-samples", "5", "--steps", "2", "--no-progress"]) == 0
    marker = json.loads((run / ".diffmath-run").read_text())
    ours = sorted(marker["files"])
    assert ours == sorted(
        [
            "config.json",
            "loss.png",
            "schedule.png",
            "step-000002.json",
            "step-000002.safetensors",
            "samples.npz",
            "samples.png",
        ]
    )
    # the user's own files in the run folder, one of them named like a diffmath file
    (run / "report.md").write_text("my notes\n")
    (run / "notes.txt").write_text("mine\n")
    (run / "mine").mkdir()
    (run / "mine" / "config.json").write_text("{}\n")
    (run / ".notes.txt.abcdefgh.tmp").write_text("not ours: notes.txt is not a diffmath name\n")
    (run / ".step-000009.safetensors.k3j2h1g0.tmp").write_bytes(b"\0" * 100)  # a killed write of ours
    theirs = {n: (run / n).read_bytes() for n in ("report.md", "notes.txt", ".notes.txt.abcdefgh.tmp")}
    assert main(["train", "--out", str(run), "--overwrite"] + GMM[:-3] + ["--save-every", "1", "--no-progress"]) == 0
    for n, b in theirs.items():
        assert (run / n).read_bytes() == b, n
    assert (run / "mine" / "config.json").read_text() == "{}\n"
    assert not (run / ".step-000009.safetensors.k3j2h1g0.tmp").exists()
    assert not (run / "samples.npz").exists() and (run / "step-000001.json").exists()
    marker2 = json.loads((run / ".diffmath-run").read_text())
    assert marker2["run_id"] != marker["run_id"] and "report.md" not in marker2["files"]
    assert "step-000001.json" in marker2["files"]


def test_a_damaged_marker_is_refused_not_followed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (tmp_path / "precious.txt").write_text("keep\n")
    (run / "x.txt").write_text("x\n")
    (run / ".diffmath-run").write_text(
        json.dumps({"format": "diffmath.folder/1", "files": ["../precious.txt"], "runs": []})
    )
    with pytest.raises(RunError, match="damaged"):
        open_run(run, "test", overwrite=True)
    assert (tmp_path / "precious.txt").exists() and (run / "x.txt").exists()


def test_sample_never_replaces_samples_it_did_not_write(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run)] + GMM) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "samples.png").write_bytes(b"my picture")
    assert (
        main(["sample", "--run", str(run), "--out", str(mine), "--num-samples", "5", "--steps", "2", "--no-progress"])
        == 2
    )
    assert "already holds samples.png, which diffmath did not write" in _err(capsys)
    assert (mine / "samples.png").read_bytes() == b"my picture" and not (mine / "samples.npz").exists()
    # a folder diffmath writes samples into is marked: sampling there again replaces its own files
    other = tmp_path / "other"
    for _ in range(2):
        assert (
            main(
                [
                    "sample",
                    "--run",
                    str(run),
                    "--out",
                    str(other),
                    "--num-samples",
                    "5",
                    "--steps",
                    "2",
                    "--no-progress",
                ]
            )
            == 0
        )
    assert json.loads((other / ".diffmath-run").read_text())["files"] == ["samples.npz", "samples.png"]


def test_a_run_written_before_markers_is_adopted_on_resume_and_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run)] + GMM) == 0
    assert main(["sample", "--run", str(run), "--num-samples", "5", "--steps", "2", "--no-progress"]) == 0
    (run / ".diffmath-run").unlink()  # as an older diffmath left it
    (run / ".diffmath.lock").unlink()
    (run / "notes.txt").write_text("mine\n")
    assert main(["sample", "--run", str(run), "--num-samples", "5", "--steps", "2", "--no-progress"]) == 0
    files = json.loads((run / ".diffmath-run").read_text())["files"]
    assert "samples.npz" in files and "config.json" in files and "notes.txt" not in files


# ----------------------------------------------------------------------------- the lock
_HOLDER = textwrap.dedent("""
    import sys
    from diffmath.pipeline.rundir import lock_folder
    lock = lock_folder(sys.argv[1], "holder-under-test")
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes our stdin
""")


def _hold_lock(folder):
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_writer_is_refused_while_another_process_holds_the_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run)] + GMM) == 0
    assert main(["sample", "--run", str(run), "--num-samples", "5", "--steps", "2", "--no-progress"]) == 0
    before = _snapshot(run)
    holder = _hold_lock(run)
    try:
        for argv in (
            ["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"],
            ["train", "--out", str(run), "--overwrite"] + GMM,
            ["sample", "--run", str(run), "--num-samples", "5", "--steps", "2", "--no-progress"],
            ["evaluate", "--run", str(run), "--no-progress"],
        ):
            assert main(argv) == 2, argv
            err = _err(capsys)
            assert "is in use by another diffmath process (holder-under-test, pid" in err, err
            assert "Traceback" not in err
        assert {k: v for k, v in _snapshot(run).items() if k != ".diffmath.lock"} == {
            k: v for k, v in before.items() if k != ".diffmath.lock"
        }
        # reading the run is not writing it: sampling into another folder works
        assert (
            main(
                [
                    "sample",
                    "--run",
                    str(run),
                    "--out",
                    str(tmp_path / "s"),
                    "--num-samples",
                    "5",
                    "--steps",
                    "2",
                    "--no-progress",
                ]
            )
            == 0
        )
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    # the holder has exited: its lock is gone with it
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--no-progress"]) == 0


def test_two_trainings_into_one_new_folder(tmp_path, capsys):
    # the second `diffmath train` into a folder that another one is creating is refused, whoever wins
    new = tmp_path / "new"
    new.mkdir()
    holder = _hold_lock(new)  # the first process has just created the folder and taken its lock
    try:
        assert main(["train", "--out", str(new)] + GMM) == 2
        assert "in use by another diffmath process" in _err(capsys)
        assert sorted(os.listdir(new)) == [".diffmath.lock"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    holder = subprocess.run(
        [sys.executable, "-m", "diffmath", "train", "--out", str(new)] + GMM,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert holder.returncode == 0, holder.stderr


def test_the_lock_is_reentrant_in_one_process_and_released(tmp_path):
    with lock_folder(tmp_path, "a"):
        with lock_folder(tmp_path, "b"):  # the demo locks its folder, then trains, samples, evaluates in it
            pass
        p = subprocess.run(
            [sys.executable, "-c", _HOLDER, str(tmp_path)], input="", capture_output=True, text=True, timeout=60
        )
        assert p.returncode != 0 and "in use by another diffmath process (a, pid" in p.stderr
    p = subprocess.run(
        [sys.executable, "-c", _HOLDER, str(tmp_path)], input="", capture_output=True, text=True, timeout=60
    )
    assert p.returncode == 0, p.stderr


# ----------------------------------------------------------------------------- temp files of killed writes
def test_resume_removes_the_temp_files_of_killed_writes(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run)] + GMM) == 0
    killed = [".step-000004.safetensors.k3j2h1g0.tmp", ".config.json.a_b_c_d_.tmp", ".loss.png.zzzzzzzz.tmp"]
    for n in killed:
        (run / n).write_bytes(b"\0" * 1000)
    keep = [".notes.txt.abcdefgh.tmp", "step-000004.safetensors.k3j2h1g0.tmp", ".step-000004.safetensors.tmp"]
    for n in keep:
        (run / n).write_text("not a temp file of diffmath\n")
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--no-progress"]) == 0
    for n in killed:
        assert not (run / n).exists(), n
    for n in keep:
        assert (run / n).exists(), n
    # an unmarked folder is never cleaned: the same names stay
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / killed[0]).write_bytes(b"\0")
    with pytest.raises(RunError, match="not a folder that diffmath wrote"):
        open_run(bare, "test", overwrite=True)
    assert (bare / killed[0]).exists()


def test_latent_runs_overwrite_their_own_sub_runs_only(tmp_path):
    # clear_run follows the marker into the sub-runs it lists (unet/, vae/), never elsewhere
    out = tmp_path / "run"
    with open_run(out, "test"):
        with open_run(out / "unet", "test"):
            (out / "unet" / "x.bin").write_bytes(b"")  # not written through diffmath: not listed
            from diffmath.pipeline.io import atomic_write_json

            atomic_write_json(out / "unet" / "config.json", {"a": 1})
        with claim_output(out / "vae", "test", ("vae.json",)):
            atomic_write_json(out / "vae" / "vae.json", {"b": 1})
        atomic_write_json(out / "latent.json", {"c": 1})
        (out / "own").mkdir()
        (out / "own" / "latent.json").write_text("theirs")
        m = json.loads((out / ".diffmath-run").read_text())
        assert m["files"] == ["latent.json"] and m["runs"] == ["unet", "vae"]
        clear_run(out)
    assert not (out / "vae").exists() and not (out / "latent.json").exists()
    assert sorted(os.listdir(out / "unet")) == [".diffmath-run", ".diffmath.lock", "x.bin"]
    assert (out / "own" / "latent.json").read_text() == "theirs"
    assert json.loads((out / ".diffmath-run").read_text())["runs"] == ["unet"]
    np.testing.assert_equal(json.loads((out / "unet" / ".diffmath-run").read_text())["files"], [])
