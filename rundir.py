"""The run directory: its config.json (the run's identity), the guard that never deletes a folder alol did not make,
and files written whole or not at all."""
import dataclasses
import json
import os
import shutil
import time

from cli import AlolError
from distributed import barrier, is_main

# Settings that may differ when --resume adds methods to or re-evaluates an existing run.
NOT_RUN_IDENTITY = {"algo", "resume", "overwrite", "out_dir", "device", "kernel", "cache_dir", "report_to"}
RUN_MARKER = "alol_run"  # a key of config.json that only alol writes: --overwrite deletes no folder without it


def write_atomic(path: str, content):
    """Write text (or bytes) to a temporary file and rename, so an interrupted run never leaves a half-written file;
    the temporary name is the process's own, so runs sharing a folder never race on it."""
    if not is_main():  # under torchrun, rank 0 writes
        return
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)
    os.replace(tmp, path)


def follow_umask(folder: str):
    """Give the files in `folder` the modes the user's umask allows (0644 under the usual 022): safetensors writes
    its files 0600, which would keep a checkpoint from the group that shares the run directory."""
    umask = os.umask(0)
    os.umask(umask)  # reading the umask means setting it: put it back at once
    for root, _, files in os.walk(folder):
        for f in files:
            os.chmod(os.path.join(root, f), 0o666 & ~umask)


def prepare(args, fingerprints: dict) -> str:
    """The run directory, with config.json: the settings, the fingerprints of the data and reward code, and the
    RUN_MARKER that only alol writes. A folder without the marker is never used or deleted; one holding a different
    run (other settings, or data or reward code that changed since) is kept unless --overwrite."""
    name = os.path.basename(args.train_file).split(".")[0] if args.train_file else args.task  # your data's name
    out = args.out_dir or os.path.join("runs", f"{name}-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
    config_path = os.path.join(out, "config.json")
    config = {RUN_MARKER: True, **dataclasses.asdict(args), "fingerprints": fingerprints}
    try:
        old = json.load(open(config_path)) if os.path.isdir(out) and os.listdir(out) else None
    except (OSError, ValueError):
        old = {}
    if old is not None and old.get(RUN_MARKER) is not True:
        raise AlolError(f"--out-dir {out} holds files that alol did not write (no alol config.json): choose another "
                        "--out-dir; alol never deletes such a folder")
    if args.resume and old is None:
        raise AlolError(f"--resume: {out or 'no --out-dir given'} holds no run to resume")
    if old is not None and not args.overwrite:
        differ = [k for k in config if k not in NOT_RUN_IDENTITY | {"fingerprints"} and old.get(k) != config[k]]
        differ += [k for k, v in fingerprints.items() if old["fingerprints"].get(k) != v]
        if differ:
            raise AlolError(f"--out-dir {out} already holds a different run (differs in: {', '.join(differ[:6])}); "
                            "pass --overwrite to replace it, or choose another --out-dir")
        if not args.resume:
            raise AlolError(f"--out-dir {out} already holds this run; pass --resume to continue it or --overwrite "
                            "to restart")
    barrier()  # every process has read the old config before rank 0 replaces it
    if is_main():
        if old is not None and args.overwrite:
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
    write_atomic(config_path, json.dumps(config, indent=1))
    return out
