"""The fault battery's multi-process cases, run as a user runs them: `python alol.py` and `torchrun --nproc_per_node 2
alol.py` (gloo on CPU) in their own process groups, stopped by SIGTERM (what schedulers send) or by a process that
dies, then resumed with the command they print; and --resume with another process count, which is another run."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ALOL = str(Path(__file__).resolve().parent.parent / "alol.py")
TINY = ["--device", "cpu", "--kernel", "torch", "--n-train", "96", "--n-val", "8", "--n-test", "4",
        "--value-samples", "1", "--value-epochs", "1", "--batch-size", "16", "--ref-epochs", "12", "--epochs", "1",
        "--eval-max-new-tokens", "4", "--eval-batch-size", "4", "--report-to", "none", "--algo", "nll",
        "--save-every", "5"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}


def launcher(processes):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"] \
        if processes > 1 else [sys.executable]


def start(tmp, processes, *extra):
    """The run in tmp/run, in a process group of its own, stopped once its reference stage has saved a checkpoint."""
    argv = [*TINY, "--out-dir", str(tmp / "run"), "--cache-dir", str(tmp / "cache"), *extra]
    job = subprocess.Popen([*launcher(processes), ALOL, *argv], cwd=tmp, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, start_new_session=True)
    state, deadline = tmp / "run" / "reference" / "checkpoint" / "trainer_state.pt", time.time() + 300
    while not state.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert job.poll() is None, job.communicate()[0]
    return job, argv


def finish(job, timeout=300):
    out = job.communicate(timeout=timeout)[0]
    return job.returncode, out


def resume(tmp, command):
    """The printed command, run as printed (python or torchrun), to the end."""
    done = subprocess.run(shlex.split(command), cwd=tmp, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [json.loads(r)["step"] for r in open(tmp / "run" / "reference" / "log.jsonl")]
    assert steps == list(range(1, len(steps) + 1)) and (tmp / "run" / "results.json").exists()


def ours(out):
    """What alol's processes printed about the stop: lines not from torchrun's launcher (W..., E..., its traceback)."""
    return [line for line in out.splitlines() if re.match(r"(terminated|interrupted|error)", line)]


def test_sigterm_under_torchrun_is_one_line_and_another_process_count_is_another_run(tmp_path):
    job, argv = start(tmp_path, 2)
    os.killpg(job.pid, signal.SIGTERM)  # as a scheduler: torchrun and both workers
    code, out = finish(job)
    assert code != 0 and "Connection closed" not in out and 'alol.py", line' not in out, out  # no worker traceback
    (line,) = ours(out)
    match = re.fullmatch(r"terminated \(SIGTERM\) in train reference, step (\d+) of \d+; to continue: (torchrun --standalone "
                         r"--nproc_per_node 2 .*alol\.py .* --resume)", line)
    assert match and match[2].endswith(shlex.join(argv + ["--resume"])), line
    one = subprocess.run([sys.executable, ALOL, *argv, "--resume"], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True)  # the global batch would halve: the schedule and every step would change
    assert one.returncode == 1 and one.stderr.strip().endswith("(differs in: processes, global batch); pass "
                                                               "--overwrite to replace it, or choose another --out-dir")
    resume(tmp_path, match[2])


def test_a_dead_peer_is_named_with_the_resume_command(tmp_path):
    job, argv = start(tmp_path, 2)
    workers = subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split()
    environ = {pid: dict(kv.split(b"=", 1) for kv in open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
                         if b"=" in kv) for pid in workers}
    (rank1,) = [pid for pid in workers if environ[pid].get(b"RANK") == b"1"]
    os.kill(int(rank1), signal.SIGKILL)  # out of memory, a node failure
    code, out = finish(job)
    assert code != 0 and 'alol.py", line' not in out, out
    (line,) = ours(out)
    match = re.fullmatch(r"error: the process of rank 1 died \(.*\); stopped in train reference, step \d+ of \d+; to continue: "
                         r"(torchrun --standalone --nproc_per_node 2 .* --resume)", line)
    assert match, line
    resume(tmp_path, match[1])


def test_sigterm_on_one_process_and_a_resume_with_two_is_refused(tmp_path):
    job, argv = start(tmp_path, 1)
    os.killpg(job.pid, signal.SIGTERM)
    code, out = finish(job)
    assert code == 143 and 'alol.py", line' not in out, out
    (line,) = ours(out)
    match = re.fullmatch(r"terminated \(SIGTERM\) in train reference, step \d+ of \d+; to continue: (python .*alol\.py .* "
                         r"--resume)", line)
    assert match, line
    two = subprocess.run([*launcher(2), ALOL, *argv, "--resume"], cwd=tmp_path, env=ENV, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode != 0 and "(differs in: processes, global batch)" in two.stdout + two.stderr
    resume(tmp_path, match[1].replace("python ", f"{sys.executable} ", 1))
