"""The training run's progress display, and stopping a harvest between two model forwards.

One rate (tqdm's), a count that never passes ``--training-tokens``, "harvesting chunk N" while
the model runs (the first chunk can take a while before any token is trained), and the latest
metrics. On a terminal it is a tqdm bar; elsewhere (a log file, a pipe) tqdm's cursor movements
would land in the log as escape codes, so it writes plain log lines instead.
"""

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger("mlsae_lens.training")


class HarvestInterrupted(Exception):
    """A stop was requested while a chunk was being harvested (see :func:`watch_harvest`)."""


class TrainingProgress:
    """Tokens trained out of ``total``; plain log lines (at most one per ``log_interval_s``
    seconds, and one at the end) where stderr is not a terminal."""

    def __init__(self, total: int, initial: int, log_interval_s: float = 30.0):
        self.total, self.done = total, min(initial, total)
        self.start_tokens = self.done
        self.log_interval_s = log_interval_s
        # disable=None: tqdm turns itself off when stderr is not a terminal.
        self.bar = tqdm(total=total, initial=self.done, desc="training", unit="tok", disable=None, dynamic_ncols=True)
        self.started = self.last_line = time.perf_counter()
        self.postfix: dict[str, str] = {}
        self.showing_harvest = False

    @property
    def plain(self) -> bool:
        return bool(self.bar.disable)

    def __enter__(self) -> "TrainingProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.plain and self.done > self.start_tokens:
            self.log_line()
        self.bar.close()

    def harvesting(self, chunk: int, group: int) -> None:
        """The model is running forward ``group`` of ``chunk`` (no token is trained meanwhile)."""
        if self.plain:
            if self.done == self.start_tokens and group == 0:
                logger.info("harvesting chunk %d (the model's forward passes) before the first step", chunk)
            return
        if group == 0:
            self.showing_harvest = True
            self.bar.set_postfix_str(f"harvesting chunk {chunk}", refresh=True)

    def advance(self, tokens: int) -> None:
        """Trained ``tokens`` in all (the last batch may pass the total; the bar stops at it)."""
        step = max(0, min(tokens, self.total) - self.done)
        self.done += step
        if self.showing_harvest:
            self.showing_harvest = False
            self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(step)
        if self.plain and time.perf_counter() - self.last_line >= self.log_interval_s:
            self.log_line()

    def metrics(self, metrics: dict[str, float]) -> None:
        self.postfix = {"loss": f"{metrics['loss']:.3f}", "fvu": f"{metrics['fvu']:.3f}",
                        "l0": f"{metrics['l0']:.1f}", "dead": f"{metrics['dead_fraction']:.2f}"}
        if not self.plain:
            self.bar.set_postfix(self.postfix, refresh=False)

    def log_line(self) -> None:
        self.last_line = time.perf_counter()
        rate = (self.done - self.start_tokens) / max(1e-9, self.last_line - self.started)
        details = "".join(f" {k}={v}" for k, v in self.postfix.items())
        logger.info("training: %d/%d tokens (%.0f%%), %.0f tok/s%s", self.done, self.total,
                    100 * self.done / self.total, rate, details)


@contextmanager
def watch_harvest(stream: Any, progress: TrainingProgress, stop_requested: Callable[[], bool]) -> Iterator[None]:
    """Report each model forward of ``stream`` to ``progress`` and raise
    :class:`HarvestInterrupted` before the next one once ``stop_requested()``: Ctrl-C then takes
    effect within one forward instead of after the whole chunk (about 45 s on CPU)."""
    harvest_group = stream.harvest_group

    def watched(group: int, contexts: Any, chunk: int) -> Any:
        if stop_requested():
            raise HarvestInterrupted
        progress.harvesting(chunk, group)
        return harvest_group(group, contexts, chunk)

    stream.harvest_group = watched
    try:
        yield
    finally:
        vars(stream).pop("harvest_group", None)  # the class's method again


class progress_bar(tqdm):  # noqa: N801 - used like tqdm, which it is
    """``tqdm`` on a terminal; elsewhere (a log file, a pipe) plain log lines instead of its
    carriage returns and cursor movements: one at most every ``log_interval_s`` seconds and one
    when it closes. Every long loop outside training (eval, analyze, baselines, lenses) uses it."""

    def __init__(self, *args: Any, log_interval_s: float = 30.0, **kwargs: Any):
        kwargs.setdefault("disable", None)  # None: tqdm turns itself off when not on a terminal
        super().__init__(*args, **kwargs)
        self.plain = bool(self.disable)
        self.log_interval_s = log_interval_s
        self.label, self.unit_name = kwargs.get("desc") or "progress", kwargs.get("unit", "it")
        self.count = self.first = kwargs.get("initial", 0) or 0
        self.started = self.last_line = time.perf_counter()
        self.logged_close = False

    def __iter__(self) -> Iterator[Any]:
        if not self.plain:
            yield from super().__iter__()
            return
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: float | None = 1) -> bool | None:
        if self.plain:
            self.count += n or 0
            if time.perf_counter() - self.last_line >= self.log_interval_s:
                self.log_line()
        return super().update(n)

    def close(self) -> None:
        if getattr(self, "plain", False) and not self.logged_close and self.count > self.first:
            self.logged_close = True
            self.log_line()
        super().close()

    def log_line(self) -> None:
        self.last_line = time.perf_counter()
        rate = (self.count - self.first) / max(1e-9, self.last_line - self.started)
        total = f"/{self.total:g}" if self.total else ""
        logging.getLogger("mlsae_lens").info("%s: %g%s %s, %.1f %s/s", self.label, self.count, total,
                                             self.unit_name, rate, self.unit_name)
