"""The watchdog ends a process that stops making progress, and leaves a busy one alone."""

from __future__ import annotations

import time

from gpt2.errors import EXIT_HUNG
from gpt2.watchdog import Watchdog


def test_no_beat_for_the_timeout_exits_with_the_hang_code_and_says_where(capsys):
    codes = []
    with Watchdog(0.3, where=lambda: "rank 1, step 7", exit=codes.append):
        time.sleep(1.5)
    assert codes == [EXIT_HUNG]
    err = capsys.readouterr().err
    assert "no progress for" in err and "rank 1, step 7" in err and "train.hang_timeout_s=0.3" in err
    assert "Thread" in err  # the stacks of every thread, to see where it hung


def test_regular_beats_keep_it_quiet_and_zero_disables_it():
    codes = []
    with Watchdog(0.5, where=lambda: "", exit=codes.append) as dog:
        for _ in range(15):
            time.sleep(0.1)
            dog.beat()
    with Watchdog(0, where=lambda: "", exit=codes.append):
        time.sleep(0.3)
    assert codes == []
