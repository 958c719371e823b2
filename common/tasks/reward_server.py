"""The reward child's side of ``common.tasks.guard`` (``python -m common.tasks.reward_server [modules]``): import
the modules named, say ready, then score one request at a time until stdin closes. Its own module so the
guard, which ``Task.reward`` uses, imports nothing from the tasks."""
from __future__ import annotations

import importlib
import json
import os
import sys
import traceback

from common.config.task import TaskConfig
from common.tasks import get_task
from common.tasks.base import Item
from common.tasks.guard import HEADER, frame


def serve(preload: list[str]) -> None:
    # Frames go to a private copy of fd 1; anything a library prints lands on stderr instead of the pipe.
    stdout = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for module in preload:
        importlib.import_module(module)
    stdin = sys.stdin.buffer
    stdout.write(frame({"ready": True}))
    stdout.flush()
    tasks = {}
    while header := stdin.read(HEADER):
        req = json.loads(stdin.read(int.from_bytes(header, "big")))
        try:
            key = json.dumps(req["cfg"], sort_keys=True)
            if key not in tasks:
                tasks[key] = get_task(TaskConfig.model_validate(req["cfg"]))
            item = req["item"]
            r = tasks[key].compute_reward(req["completion"], Item(**{**item, "numbers": tuple(item["numbers"])}))
            out = {"total": r.total, "correct": r.correct, "components": r.components}
        except Exception:  # noqa: BLE001 - reported to the parent, which raises it there
            out = {"error": traceback.format_exc()}
        stdout.write(frame(out))
        stdout.flush()


if __name__ == "__main__":
    serve(sys.argv[1:])
