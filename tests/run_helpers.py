"""Shared by the end-to-end tests: run a real training run while a watcher thread acts on it."""
from __future__ import annotations

import threading
from typing import Callable


def train_beside(cfg, watch: Callable[..., None], *args) -> int:
    """``train(cfg)`` on this thread while ``watch(*args, stop)`` polls the run directory on another
    (scaling the pool, killing actors, ...); returns the run's exit code once the watcher has stopped."""
    from driver.train import train

    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(*args, stop), daemon=True)
    watcher.start()
    try:
        return train(cfg)
    finally:
        stop.set()
        watcher.join(timeout=5)


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process (Linux /proc; no psutil, which no dependency
    brings)."""
    import os
    from pathlib import Path

    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                stat = (entry / "stat").read_text()
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:  # the process exited while we looked
                continue
            table[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmd)
    return table


def descendants(roots: list[int]) -> list[tuple[int, str]]:
    """(pid, command line) of every process below ``roots``, Ray's workers included (they start in sessions
    of their own, so killing a `ray start` process group leaves them running)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            found.append((child, table[child][1]))
    return found


def actor_pids(roots: list[int], class_name: str) -> list[int]:
    """Processes of live actors of a class (Ray titles them ``ray::<Class>``) descending from ``roots`` (a
    raylet, or a cluster's `ray start` processes): other Ray instances on the machine are left alone."""
    return sorted(pid for pid, cmd in descendants(roots) if cmd.startswith(f"ray::{class_name}"))
