"""Remote control of the test's S3 server for `gpt2.chaos --store CMD`.

The server belongs to the pytest process (a session fixture), so the chaos run's store command,
`python tests/helpers/store_ctl.py DIR ACTION`, asks for the action through files in DIR and waits
until `StoreController` (a thread in the test) has done it:

    DIR/<n>-<action>.req   written by the command
    DIR/<n>-<action>.done  written by the controller once done ("" or the error)
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

ACTIONS = ("stop", "start", "freeze", "thaw")
WAIT_S = 100


class StoreController:
    """Does the requested actions to `server` (tests.helpers.s3.S3Server) until stopped; every
    action is recorded in `done` with its monotonic time."""

    def __init__(self, server, directory: Path):
        self.server, self.dir = server, directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.done: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> StoreController:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        if self.server.proc is None:  # never leave the session's server down or frozen
            self.server.start()
        else:
            os.kill(self.server.proc.pid, signal.SIGCONT)

    def _serve(self) -> None:
        while not self._stop.is_set():
            for req in sorted(self.dir.glob("*.req")):
                done = req.with_suffix(".done")
                if done.exists():
                    continue
                action = req.stem.split("-", 1)[1]
                try:
                    self._do(action)
                    error = ""
                except Exception as err:  # reported to the command, which fails with it
                    error = f"{type(err).__name__}: {err}"
                self.done.append((action, time.monotonic()))
                tmp = req.with_suffix(".tmp")
                tmp.write_text(error)
                tmp.rename(done)  # whole, or not there yet
            time.sleep(0.1)

    def _do(self, action: str) -> None:
        if action == "stop":
            self.server.stop()
        elif action == "start":
            self.server.start()
        elif action in ("freeze", "thaw"):
            os.kill(self.server.proc.pid, signal.SIGSTOP if action == "freeze" else signal.SIGCONT)
        else:
            raise ValueError(f"unknown action {action!r}")


def main() -> int:
    if len(sys.argv) != 3 or sys.argv[2] not in ACTIONS:
        print(f"usage: store_ctl.py DIR {{{','.join(ACTIONS)}}}", file=sys.stderr)
        return 2
    directory, action = Path(sys.argv[1]), sys.argv[2]
    req = directory / f"{time.time_ns()}-{action}.req"
    req.write_text("")
    done = req.with_suffix(".done")
    deadline = time.monotonic() + WAIT_S
    while not done.exists():
        if time.monotonic() > deadline:
            req.unlink(missing_ok=True)  # not later either
            print(f"the store controller did not {action} the store within {WAIT_S} s", file=sys.stderr)
            return 1
        time.sleep(0.1)
    error = done.read_text()
    if error:
        print(error, file=sys.stderr)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
