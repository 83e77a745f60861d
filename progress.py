"""Progress: a tqdm bar on stderr when it is a terminal; where it is not (nohup, CI, Slurm, a pipe into a file) a
status line on stdout when a stage starts and ends and one about every EVERY_S seconds in between, so the log shows
that the run is alive, how far it is and how long it still needs, between the run's other lines (stderr keeps errors
alone, one line each). The stages open at a Ctrl-C are what cli.where reports."""
import sys
import time

from tqdm.auto import tqdm

from distributed import is_main

EVERY_S = 30.0  # between status lines: often enough for `tail -f`, rare enough for the log of a day-long run
OPEN = []  # the stages running now, outermost first (a validation's generation inside a training stage)
FINISHED = []  # the names of the stages run to their end, in order


def duration(seconds: float) -> str:
    """`42 s`, `3 min 5 s`, `2 h 10 min`."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    return f"{s // 60} min" + (f" {s % 60} s" if s % 60 else "") if s < 3600 else f"{s // 3600} h {s % 3600 // 60} min"


class Stage:
    """`for x in Stage(iterable, "train a_lol", total)`: a tqdm bar on a terminal, else status lines; rank 0 only.
    set_postfix(**stats) shows the last step's statistics in both."""

    def __init__(self, iterable, name: str, total: int = None, initial: int = 0, unit: str = "step",
                 leave: bool = True):
        self.iterable, self.name, self.unit = iterable, name, unit
        self.total = len(iterable) + initial if total is None else total
        self.n, self.stats = initial, {}  # n: units done, those before a --resume included
        terminal = getattr(sys.stderr, "isatty", lambda: False)()
        # A disabled bar where lines are printed: it still marks the stage for scripts/rehearsal.py's probe.
        self.bar = tqdm(desc=name, total=self.total, initial=initial, unit=unit, leave=leave, dynamic_ncols=True,
                        disable=not (is_main() and terminal))
        # No lines for a single unit (one scoring call, one batch of generations): it has nothing to count.
        self.lines = is_main() and not terminal and self.total - initial > 1

    def set_postfix(self, **stats):
        self.stats = stats
        self.bar.set_postfix(stats, refresh=False)

    def count(self, n: int) -> str:
        return f"{n} {self.unit}" + ("" if n == 1 else "es" if self.unit == "batch" else "s")

    def say(self, what: str, after: str = ""):
        stats = "".join(f", {k} {v}" for k, v in self.stats.items())
        print(f"[{time.strftime('%H:%M:%S')}] {self.name}: {what}{stats}{after}", flush=True)

    def __iter__(self):
        OPEN.append(self)
        start = last = now = time.monotonic()
        first = self.n
        if self.lines:
            self.say(f"start, {self.count(self.total - first)}" + (f" after {first} done" if first else ""))
        try:
            for item in self.iterable:
                yield item
                self.n += 1
                self.bar.update()
                now = time.monotonic()
                if self.lines and now - last >= EVERY_S and self.n < self.total:
                    last, left = now, (now - start) / (self.n - first) * (self.total - self.n)
                    self.say(f"{self.unit} {self.n} of {self.total}", f"; {duration(now - start)} so far, about "
                             f"{duration(left)} left")
        finally:
            self.bar.close()
        # Reached only at the end: a stage stopped by an exception stays in OPEN for cli.where (cli.run empties it).
        OPEN.remove(self)
        FINISHED.append(self.name)
        if self.lines:
            self.say(f"done, {self.count(self.n - first)} in {duration(now - start)}")

    def position(self) -> str:
        """Where this stage is: `train a_lol, step 41 of 250` (the one under way, counted from 1)."""
        return f"{self.name}, {self.unit} {min(self.n + 1, self.total)} of {self.total}"
