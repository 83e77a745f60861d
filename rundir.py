"""The run directory: its config.json (the run's identity), the lock that lets one run at a time use it, the guard
that never deletes a folder alol did not make, and files written whole or not at all."""
import dataclasses
import errno
import fcntl
import json
import os
import shutil
import time

from cli import AlolError, disk_full
from distributed import barrier, from_main, is_main

# Settings that may differ when --resume adds methods to or re-evaluates an existing run.
NOT_RUN_IDENTITY = {"algo", "resume", "overwrite", "out_dir", "device", "kernel", "cache_dir", "report_to"}
RUN_MARKER = "alol_run"  # a key of config.json that only alol writes: --overwrite deletes no folder without it
LOCK = ".alol.lock"  # in the run directory: flock-ed for the whole run, it holds the running process's pid
held = {}  # run directory -> the open lock file, kept open (locked) until the run ends (unlock)


def write_atomic(path: str, content):
    """Write text (or bytes) to a temporary file and rename, so an interrupted run never leaves a half-written file;
    the temporary name is the process's own, so runs sharing a folder never race on it."""
    if not is_main():  # under torchrun, rank 0 writes
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
            f.write(content)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, len(content)) from None
        raise
    os.replace(tmp, path)


def follow_umask(folder: str):
    """Give the files in `folder` the modes the user's umask allows (0644 under the usual 022): safetensors writes
    its files 0600, which would keep a checkpoint from the group that shares the run directory."""
    umask = os.umask(0)
    os.umask(umask)  # reading the umask means setting it: put it back at once
    for root, _, files in os.walk(folder):
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def lock(out: str) -> str:
    """Take the run directory's lock (rank 0), or "" with why not: the pid of the run that holds it. The OS frees
    the lock when its process ends, however it ends, so a crashed run's lock is simply taken over."""
    path, key = os.path.join(out, LOCK), os.path.realpath(out)
    if key in held and os.path.exists(path) and os.stat(path).st_ino == os.fstat(held[key].fileno()).st_ino:
        return ""  # this process holds it already (runs in one process, as the tests make)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        return f"--out-dir {out} is in use by another alol run (pid {holder}); wait for it to end, or choose another "\
            "--out-dir"
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    held[key] = f
    return ""


def unlock():
    """Release this process's run-directory locks: its run is over (the OS would at exit)."""
    while held:
        held.popitem()[1].close()


def clear(out: str):
    """Delete what the run directory holds but its lock, which this run keeps; `out` may be a symlink to it."""
    for name in set(os.listdir(out)) - {LOCK}:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def read_config(out: str):
    """The run's config.json; None for a folder that is missing or empty (but for a lock), {} for foreign files."""
    if not (os.path.isdir(out) and set(os.listdir(out)) - {LOCK}):
        return None
    try:
        return json.load(open(os.path.join(out, "config.json")))
    except (OSError, ValueError):
        return {}


def prepare(args, fingerprints: dict) -> str:
    """The run directory, locked for this run, with config.json: the settings, the fingerprints of what the run
    reads (caches.run_fingerprints) and the RUN_MARKER that only alol writes. A folder without the marker is never
    used or deleted; one holding a different run (other settings, or anything it read that changed since) is kept
    unless --overwrite; a --resume that would drop methods the run holds is refused."""
    name = os.path.basename(args.train_file).split(".")[0] if args.train_file else args.task  # your data's name
    out = args.out_dir or os.path.join("runs", f"{name}-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    config_path = os.path.join(out, "config.json")
    config = {RUN_MARKER: True, **dataclasses.asdict(args), "fingerprints": fingerprints}
    old = read_config(out)
    if old is not None and old.get(RUN_MARKER) is not True:
        raise AlolError(f"--out-dir {out} holds files that alol did not write (no alol config.json): choose another "
                        "--out-dir; alol never deletes such a folder")
    if args.resume and old is None:
        raise AlolError(f"--resume: {out or 'no --out-dir given'} holds no run to resume")
    if is_main():
        os.makedirs(out, exist_ok=True)
    held_by = from_main(lock(out) if is_main() else None)
    if held_by:
        raise AlolError(held_by)
    old = read_config(out)  # again, under the lock: a run that held it may have changed it
    if old is not None and not args.overwrite:
        differ = [k for k in config if k not in NOT_RUN_IDENTITY | {"fingerprints"} and old.get(k) != config[k]]
        differ += [k for k, v in fingerprints.items() if old["fingerprints"].get(k) != v]
        if differ:
            raise AlolError(f"--out-dir {out} already holds a different run (differs in: {', '.join(differ[:6])}); "
                            "pass --overwrite to replace it, or choose another --out-dir")
        if not args.resume:
            raise AlolError(f"--out-dir {out} already holds this run; pass --resume to continue it or --overwrite "
                            "to restart")
        dropped = [a for a in old["algo"].split(",") if a not in args.algo.split(",") and args.algo != "all"]
        if dropped:  # results.json would lose them (their folders stay)
            raise AlolError(f"--resume with --algo {args.algo} would drop {','.join(dropped)} from this run's "
                            f"results: pass --algo {old['algo']} plus any methods to add")
    barrier()  # every process has read the old config before rank 0 replaces it
    if is_main() and old is not None and args.overwrite:
        clear(out)
    write_atomic(config_path, json.dumps(config, indent=1))
    return out
