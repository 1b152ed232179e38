"""Run a Python module with every asyncio callback's CPU time recorded, by what it runs: where an
agent's event loop spends its CPU. `benchmarks/runtime_processes.py --loop-profile` runs the edge
agents under it.

    python benchmarks/loop_profile.py OUT.json -m MODULE [ARGS ...]

OUT.json gets, for the whole run of MODULE: the CPU time of the process and of its main thread, and
per callback (a task's step is named by its coroutine, a plain callback by its function) the main
thread's CPU spent running it, how many times it ran, and the module it comes from. The main
thread's CPU between the first callback's start and the last one's end (`in_loop_s`) less the
callbacks' is the loop's own (polling the selector, scheduling).
"""

from __future__ import annotations

import json
import runpy
import sys
import time
from asyncio import events
from collections import Counter, defaultdict
from typing import Any

cpu: dict[str, float] = defaultdict(float)
calls: Counter[str] = Counter()
modules: dict[str, str] = {}
window = {"first": -1.0, "last": 0.0}  # main-thread CPU at the first callback's start, the last's end


def _name(callback: Any) -> tuple[str, str]:
    owner = getattr(callback, "__self__", None)
    if owner is not None and hasattr(owner, "get_coro"):  # a task's step: name it by its coroutine
        coro = owner.get_coro()
        code = getattr(coro, "cr_code", None)
        module = code.co_filename if code is not None else "?"
        return f"task {getattr(coro, '__qualname__', '?')}", module
    func = getattr(callback, "func", callback)  # functools.partial
    name = getattr(func, "__qualname__", None) or type(func).__qualname__
    module = getattr(func, "__module__", None) or type(func).__module__
    return name, module


def _install() -> None:
    run = events.Handle._run

    def timed(self: events.Handle) -> None:
        name, module = _name(self._callback)  # type: ignore[attr-defined]  # before: running may cancel it
        t0 = time.thread_time()
        run(self)
        t1 = time.thread_time()
        cpu[name] += t1 - t0
        calls[name] += 1
        modules.setdefault(name, module)
        if window["first"] < 0:
            window["first"] = t0
        window["last"] = t1

    events.Handle._run = timed  # type: ignore[method-assign]


def main() -> None:
    out, flag, module, *args = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: loop_profile.py OUT.json -m MODULE [ARGS ...]")
    _install()
    sys.argv = [module, *args]
    t0, p0 = time.thread_time(), time.process_time()
    code: str | int | None = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, (str, int)) or exc.code is None else 1
    finally:
        report = {
            "process_s": time.process_time() - p0,
            "main_thread_s": time.thread_time() - t0,
            "in_loop_s": window["last"] - window["first"],  # the main thread's CPU while its loop ran
            "callbacks": {k: {"cpu_s": v, "calls": calls[k], "module": modules[k]} for k, v in cpu.items()},
        }
        with open(out, "w") as f:
            json.dump(report, f)
    sys.exit(code)


if __name__ == "__main__":
    main()
