"""One writer per --out: a second fis process on a folder another one is writing is refused in one line (the
lock ``.fis.lock``, held with ``flock`` so a killed process leaves no stale lock), while the ranks of one sharded
harvest or battery share it. Concurrent ownership updates from several ranks lose no file name."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fis_interventions.cli import main
from fis_interventions.errors import FisError
from fis_interventions.fingerprint import FINGERPRINT_FILE, Fingerprint, claim, release_folder

ROOT = Path(__file__).resolve().parents[2]


class Holder:
    """A child process that claims ``out`` (exclusive or shared) and keeps it until told to stop."""

    def __init__(self, out: Path, shared: bool = False, lock_only: bool = False) -> None:
        take = (f"Path({str(out)!r}).mkdir(); lock_folder(Path({str(out)!r}))" if lock_only else
                f"claim({str(out)!r}, Fingerprint('s', {{'v': 1}}), shared={shared!r})")
        code = textwrap.dedent(f"""
            import sys
            from pathlib import Path
            from fis_interventions.fingerprint import Fingerprint, claim, lock_folder
            {take}
            print("held", flush=True)
            sys.stdin.readline()
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def stop(self) -> None:
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def test_a_second_writer_is_refused_in_one_line(tmp_path):
    out = tmp_path / "o"
    holder = Holder(out)
    try:
        with pytest.raises(FisError, match="another fis process is writing") as err:
            claim(out, Fingerprint("s", {"v": 1}))
        assert "\n" not in str(err.value)
    finally:
        holder.stop()
    assert claim(out, Fingerprint("s", {"v": 1})) == "resume"  # the lock went with the process
    release_folder(out)


def test_a_killed_writer_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "o"
    holder = Holder(out)
    holder.proc.kill()
    holder.proc.wait(timeout=60)
    assert claim(out, Fingerprint("s", {"v": 1})) == "resume"
    release_folder(out)


def test_ranks_share_the_lock_but_a_plain_run_is_refused(tmp_path):
    out = tmp_path / "o"
    holder = Holder(out, shared=True)
    try:
        assert claim(out, Fingerprint("s", {"v": 1}), shared=True) == "resume"  # another rank of the same run
        release_folder(out)
        with pytest.raises(FisError, match="another fis process"):
            claim(out, Fingerprint("s", {"v": 1}))
    finally:
        holder.stop()


def test_concurrent_ownership_updates_lose_nothing(tmp_path):
    out = tmp_path / "o"
    claim(out, Fingerprint("s", {"v": 1}))
    release_folder(out)
    code = textwrap.dedent("""
        import sys
        from fis_interventions.fingerprint import own
        rank = int(sys.argv[1])
        for i in range(25):
            own(sys.argv[2], [f"shard_{rank}_{i}"])
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r), str(out)], cwd=ROOT) for r in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    files = json.loads((out / FINGERPRINT_FILE).read_text())["files"]
    assert len(files) == 100


def test_second_battery_on_one_out_is_refused_through_the_cli(tmp_path, capsys):
    """Two batteries on one --out ended in sqlite3.IntegrityError; now the second is refused before it
    writes. (The holder holds the folder's lock as a first battery of the same settings does.)"""
    ckpt = tmp_path / "ckpt"
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_checkpoints import save_tiny_joint_checkpoint

    from fis_interventions.models import load_model

    save_tiny_joint_checkpoint(ckpt, load_model("tiny-random", device="cpu").tokenizer, seed=0)
    out = tmp_path / "run"
    cfg = tmp_path / "b.yaml"
    cfg.write_text(f"name: t\nmodel: tiny-random\ncheckpoint: {ckpt}\ndesigns: [{ROOT / 'stimuli/negation_sentiment.yaml'}]\n"
                   "features: [{point: sae.hook_latents, index: 1}]\ninterventions: [{kind: scale, values: [0.0]}]\n"
                   f"max_items: 1\ndevice: cpu\nout: {out}\n", encoding="utf-8")
    holder = Holder(out, lock_only=True)
    try:
        assert main(["battery", str(cfg), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "another fis process" in err[0]
        assert [p.name for p in out.iterdir()] == [".fis.lock"]  # nothing written by the refused run
    finally:
        holder.stop()
