"""tutorial.md cannot rot: its runnable code blocks run and print what it shows, and every function, flag and file it
names exists."""
import contextlib
import dataclasses
import importlib
import io
import os
import pathlib
import re

import pytest
import torch

import alol
import kernels

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEXT = (ROOT / "tutorial.md").read_text()
BLOCKS = re.findall(r"^```([^\n]*)\n(.*?)^```$", TEXT, flags=re.S | re.M)  # (info string, body), in order
SPANS = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```$", "", TEXT, flags=re.S | re.M))  # inline code
MACHINERY = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "alol")  # the run machinery beside alol.py
TASKS = sorted(f"tasks.{p.stem}" for p in ROOT.glob("tasks/*.py") if p.stem != "__init__") + ["tasks"]
RUNNABLE = [(body, BLOCKS[i + 1]) for i, (info, body) in enumerate(BLOCKS) if info == "python runnable"]


def test_tutorial_has_runnable_blocks_with_outputs():
    assert len(RUNNABLE) >= 5
    assert all(info == "text" for _, (info, _) in RUNNABLE), "each runnable block is followed by its output"


@pytest.mark.parametrize("code,output", [(code, out) for code, (_, out) in RUNNABLE],
                         ids=[f"block{i}" for i in range(len(RUNNABLE))])
def test_runnable_block_prints_what_the_tutorial_shows(code, output, monkeypatch):
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "tutorial.md", "exec"), {"__name__": "__tutorial__"})
    lines = lambda s: [line.rstrip() for line in s.strip().splitlines()]  # noqa: E731
    assert lines(printed.getvalue()) == lines(output)


def known_flags():
    flags = {"--help"}
    for f in dataclasses.fields(alol.parse_args([])):
        flag = "--" + f.name.replace("_", "-")
        flags |= {flag, "--no-" + flag[2:]} if isinstance(f.default, bool) else {flag}
    bench = (ROOT / "kernels" / "bench.py").read_text()
    return flags | set(re.findall(r'add_argument\((?:"-\w", )?"(--[\w-]+)"', bench))


def test_every_flag_exists():
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", TEXT))
    assert "--clip-eps" in named and "--no-priority-sampling" in named
    assert sorted(named - known_flags()) == []


def resolve(dotted):
    """The object a dotted name refers to in the project, torch or torch.Tensor; None if there is none."""
    modules = ["alol", *MACHINERY, *TASKS, "kernels", "kernels.torch_ops", "kernels.triton_ops"]
    roots = [*map(importlib.import_module, modules), torch, torch.nn.functional, torch.Tensor]
    for root in roots:
        obj = root
        for part in dotted.removeprefix(root.__name__ + ".").split("."):
            obj = getattr(obj, part, None)
        if obj is not None:
            return obj
    head, _, method = dotted.rpartition(".")
    return getattr(torch.Tensor, method, None) if head.isidentifier() else None  # `logp.sum(-1)`: a tensor method


def test_every_function_exists():
    called = {m.group(1) for span in SPANS for m in re.finditer(r"([A-Za-z_][\w.]*)\(", span)}
    assert {"train_policy", "generate", "score"} <= called
    assert sorted(name for name in called if not callable(resolve(name))) == []


def test_every_named_code_identifier_appears_in_the_code():
    """Bare identifiers the tutorial names (functions, classes, constants, fields, keys) are in the sources."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("tasks/*.py"), *ROOT.glob("kernels/*.py"), *ROOT.glob("tests/*.py")]
    source = "".join(p.read_text() for p in files)
    words = set(re.findall(r"\w+", source))
    names = {span for span in SPANS if re.fullmatch(r"[A-Za-z_]\w*", span) and ("_" in span or span.isupper()
                                                                               or span[0].isupper())}
    assert {"ValueHead", "frozen_quantities", "PRESET"} <= names
    assert sorted(names - words) == []


def test_every_file_exists():
    files = {m.group(0) for span in SPANS for m in re.finditer(r"[\w./-]+\.(?:py|md|txt|json|jsonl|png|pt|csv)"
                                                                r"(?:::\w+)?", span)}
    assert "kernels/torch_ops.py" in files
    alol_source = "".join(p.read_text() for p in [*ROOT.glob("*.py"), *ROOT.glob("tasks/*.py")])
    for name in sorted(files):
        path, _, test = name.partition("::")
        if (ROOT / path).is_file():
            if test:
                assert re.search(rf"^def {test}\(", (ROOT / path).read_text(), flags=re.M), f"no {test} in {path}"
        else:  # not in the repository: a file a run writes or reads, which alol.py or its modules must name
            assert not path.endswith(".py") and os.path.basename(path) in alol_source, f"no such file: {path}"


def test_chapters_follow_the_sections_of_alol_py():
    """tutorial.md's numbered chapters and alol.py's numbered sections are the same list: numbers and titles (the
    part before a colon)."""
    source = (ROOT / "alol.py").read_text()
    sections = [(n, title.split(":")[0]) for n, title in re.findall(r"^# (\d+)\. (.+)$", source, flags=re.M)]
    chapters = [(n, title.split(":")[0]) for n, title in re.findall(r"^## (\d+)\. (.+)$", TEXT, flags=re.M)]
    assert [n for n, _ in sections] == [str(i) for i in range(1, len(sections) + 1)]
    assert len(sections) >= 9 and chapters == sections
