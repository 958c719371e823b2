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
