"""The watchdog: a frozen step is found within the step-based limit, a long phase that makes
progress is left alone, and a phase that cannot beat gets the ceiling."""

from __future__ import annotations

import time

from gpt2 import watchdog
from gpt2.errors import EXIT_HUNG
from gpt2.watchdog import Watchdog

# the shipped mechanism at a smaller scale: floor 0.4 s, 20 x the slowest recent step, ceiling 3 s
SMALL = dict(floor_s=0.4, factor=20)


def timed_steps(dog: Watchdog, n: int = 3, seconds: float = 0.01) -> None:
    dog.steps()
    for _ in range(n):
        dog.step_done(seconds)


def test_a_frozen_step_is_found_at_the_step_based_limit_and_the_message_names_the_phase(capsys):
    codes, hangs = [], []
    with Watchdog(3.0, where=lambda: "rank 1, step 7", on_hang=hangs.append, exit=codes.append, **SMALL) as dog:
        timed_steps(dog)
        assert dog.limit_s == 0.4  # 20 x 0.01 s is below the floor
        t0 = time.monotonic()
        while not codes and time.monotonic() - t0 < 3:
            time.sleep(0.05)
    assert codes == [EXIT_HUNG] and 0.4 <= time.monotonic() - t0 < 2.0  # well before the 3 s ceiling
    assert hangs == ["training step"]
    err = capsys.readouterr().err
    assert "no progress for" in err and "phase 'training step'" in err and "rank 1, step 7" in err
    assert "20 x the slowest of the last 3 steps" in err and "Thread" in err  # the stacks of every thread


def test_a_phase_many_times_longer_than_the_limit_is_fine_while_it_beats():
    codes = []
    with Watchdog(3.0, exit=codes.append, **SMALL) as dog:
        timed_steps(dog)
        with watchdog.phase("evaluation: HellaSwag"):  # 4 s: 10 x the step-based limit, 1.3 x the ceiling
            for _ in range(40):
                time.sleep(0.1)
                watchdog.beat()
        assert dog.phase_name == "training step"
    assert codes == []


def test_a_phase_that_cannot_beat_gets_the_ceiling_and_so_do_a_compiled_models_first_steps():
    codes = []
    with Watchdog(3.0, exit=codes.append, **SMALL) as dog:
        assert dog.limit_s == 3.0  # start-up
        dog.steps(before=[0.01] * 3, compiled=True)  # the steps from before do not count: these may compile
        dog.step_done(0.01)
        assert dog.limit_s == 3.0  # fewer than MIN_TIMED steps after a start
        timed_steps(dog)
        with watchdog.phase("checkpoint save", ceiling=True):
            assert dog.limit_s == 3.0
            time.sleep(1.0)  # 2.5 x the step-based limit, without a beat
        dog.step_done(0.01)
        assert dog.limit_s == 0.4
    assert codes == []


def test_regular_steps_keep_it_quiet_zero_disables_it_and_no_watchdog_means_no_op():
    codes = []
    with Watchdog(3.0, exit=codes.append, **SMALL) as dog:
        timed_steps(dog)
        for _ in range(15):
            time.sleep(0.1)
            dog.step_done(0.1)
    with Watchdog(0, exit=codes.append):
        time.sleep(0.3)
    watchdog.beat()
    with watchdog.phase("anything"):
        pass
    assert codes == []


def test_a_process_suspended_as_a_whole_is_not_called_hung(tmp_path):
    """SIGSTOP stops the watchdog thread too: on SIGCONT it sees its own polls 12 s apart and starts
    counting afresh, instead of exiting with EXIT_HUNG at once (a real hang leaves it polling)."""
    import signal
    import subprocess
    import sys

    script = (
        "import sys, time\n"
        "from gpt2 import logs; logs.setup()\n"
        "from gpt2.watchdog import Watchdog\n"
        "with Watchdog(3.0, floor_s=0.4, factor=20) as dog:\n"
        "    dog.steps()\n"
        "    for _ in range(3): dog.step_done(0.01)\n"
        "    print('ready', flush=True)\n"
        "    t0 = time.monotonic()\n"
        "    while time.monotonic() - t0 < 16:\n"
        "        dog.beat(); time.sleep(0.05)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    proc.send_signal(signal.SIGSTOP)
    time.sleep(12)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "was suspended for 1" in err and "no progress" not in err


def test_the_first_steps_are_held_to_the_step_limit_from_the_times_before_or_the_first_micro_step_on():
    from gpt2.watchdog import FLOOR_S, STEP_FACTOR, Watchdog

    fresh, restarted, compiled = Watchdog(600), Watchdog(600), Watchdog(600)
    fresh.steps()
    restarted.steps(before=[0.5, 4.0, 0.5])
    compiled.steps(before=[0.5, 4.0, 0.5], compiled=True)
    assert fresh.limit_s == 600  # nothing known of the device's speed: the ceiling for the first micro-step
    fresh.micro_step_done(0.5)
    assert fresh.limit_s == FLOOR_S
    fresh.micro_step_done(4.0)  # a slow device (a big model on CPU): its micro-steps set the limit
    assert fresh.limit_s == STEP_FACTOR * 4.0 == 80
    for _ in range(3):  # once steps are timed, they alone
        fresh.step_done(0.5)
    assert fresh.limit_s == FLOOR_S
    compiled.micro_step_done(0.5)
    assert compiled.limit_s == 600  # its first steps may still compile: the ceiling
    for _ in range(3):
        compiled.step_done(0.5)
    assert compiled.limit_s == FLOOR_S
    assert restarted.limit_s == max(FLOOR_S, STEP_FACTOR * 4.0) == 80
    for _ in range(25):  # its own steps replace the ones from before
        restarted.step_done(0.1)
    assert restarted.limit_s == FLOOR_S


def test_beats_from_a_background_thread_do_not_hide_a_stuck_main_thread():
    import threading
    import time

    from gpt2.watchdog import Watchdog, beat

    fired, stop = [], threading.Event()

    def busy_background_work():  # a read-ahead or a copy that moves while the main thread is stuck
        while not stop.is_set():
            beat()
            time.sleep(0.05)

    worker = threading.Thread(target=busy_background_work, daemon=True)
    with Watchdog(ceiling_s=1.0, exit=fired.append):
        worker.start()
        deadline = time.monotonic() + 8
        while not fired and time.monotonic() < deadline:
            time.sleep(0.1)  # the main thread: no progress
    stop.set()
    assert fired == [201]


def test_the_record_comes_first_then_the_last_act_then_the_exit_and_other_threads_yield_to_it(monkeypatch):
    order: list[str] = []
    dog = Watchdog(3.0, on_hang=lambda phase: order.append("record"), before_exit=lambda: order.append("last act"),
                   exit=lambda code: order.append(f"exit {code}"), **SMALL)
    slept: list[float] = []
    monkeypatch.setattr(watchdog.time, "sleep", slept.append)
    dog.yield_to_hang_exit()
    assert slept == []  # no hang declared: a failing thread goes its own way at once
    with dog:
        timed_steps(dog)
        t0 = time.monotonic()
        while len(order) < 3 and time.monotonic() - t0 < 3:
            time.perf_counter()  # (time.sleep is patched) spin until the watchdog fired
    assert order == ["record", "last act", f"exit {EXIT_HUNG}"]
    dog.yield_to_hang_exit()
    assert slept and slept[-1] >= watchdog.RECORD_DEADLINE_S  # waits for the watchdog's exit instead


def test_a_phase_that_follows_work_in_another_thread_lasts_while_it_moves_and_is_found_once_it_stops(capsys):
    """A save written by a thread (async): the main thread's wait follows the save's moves; once
    they stop outside any call, the step-based limit applies (not the ceiling)."""
    import threading

    codes, stop_moving = [], threading.Event()
    work = watchdog.Work()

    def writer():  # chunks, every 0.1 s, for 2 s: 5 x the step-based limit
        for _ in range(20):
            time.sleep(0.1)
            work.moved()
        stop_moving.set()

    with Watchdog(30.0, exit=codes.append, **SMALL) as dog:
        timed_steps(dog)
        with watchdog.phase("checkpoint save", follows=work):
            threading.Thread(target=writer, daemon=True).start()
            stop_moving.wait(5)
            assert codes == []
            t0 = time.monotonic()
            while not codes and time.monotonic() - t0 < 5:
                time.sleep(0.05)
    assert codes == [EXIT_HUNG] and 0.4 <= time.monotonic() - t0 < 2.0  # the step-based limit, not the ceiling
    assert "phase 'checkpoint save'" in capsys.readouterr().err


def test_a_call_in_flight_is_waited_for_as_long_as_allowed_then_the_exit_is_the_works_code(capsys):
    """A storage call without an answer: the limit is its allowance (longer than the step-based
    limit and the ceiling here), and the exit code and message are its work's."""
    import threading

    codes, hangs = [], []
    work = watchdog.Work("checkpoint.dir has not answered within checkpoint.outage_s", code=202)
    dog = Watchdog(1.0, exit=codes.append, on_hang=hangs.append, **SMALL)

    def hung_call():
        with work.allowing(2.0):
            time.sleep(30)

    with dog:
        timed_steps(dog)
        with watchdog.phase("checkpoint save", follows=work):
            threading.Thread(target=hung_call, daemon=True).start()
            t0 = time.monotonic()
            while not codes and time.monotonic() - t0 < 6:
                time.sleep(0.05)
    assert codes == [202] and 2.0 <= time.monotonic() - t0 < 3.5, (codes, time.monotonic() - t0)
    assert hangs == ["checkpoint save"] and dog.exit_code == 202
    err = capsys.readouterr().err
    assert "what the call in flight was allowed" in err and "has not answered within checkpoint.outage_s" in err
    assert "Exiting with 202" in err


def test_work_that_moves_in_the_background_does_not_count_in_a_phase_that_does_not_follow_it():
    codes = []
    work = watchdog.Work()
    with Watchdog(3.0, exit=codes.append, **SMALL) as dog:
        timed_steps(dog)
        t0 = time.monotonic()
        while not codes and time.monotonic() - t0 < 3:
            work.moved()  # an async save moving while the main thread is stuck in a step
            time.sleep(0.05)
    assert codes == [EXIT_HUNG] and time.monotonic() - t0 < 2.0


def test_a_call_is_allowed_from_its_own_start_not_from_when_a_phase_begins_to_follow_it():
    """An async save's call hung since before the main thread joined it: the join does not restart
    its allowance (it fires at the call's own deadline), and a call whose allowance had already run
    out when it began is still blamed as the work's (its code), not as a frozen peer."""
    import threading

    codes = []
    work = watchdog.Work("checkpoint.dir has not answered", code=202)

    def hung_call(seconds):
        with work.allowing(seconds):
            time.sleep(30)

    with Watchdog(30.0, exit=codes.append, **SMALL) as dog:
        timed_steps(dog)
        threading.Thread(target=hung_call, args=(4.0,), daemon=True).start()
        for _ in range(35):  # training goes on for 3.5 s meanwhile
            time.sleep(0.1)
            dog.step_done(0.01)
        t0 = time.monotonic()
        with watchdog.phase("checkpoint save", follows=work):
            while not codes and time.monotonic() - t0 < 8:
                time.sleep(0.05)
    # the call's 4 s (0.5 s left, and the watchdog's 1 s poll), not 4 s more after the join
    assert codes == [202] and time.monotonic() - t0 < 3.0

    codes.clear()
    work = watchdog.Work("checkpoint.dir has not answered", code=202)
    with Watchdog(30.0, exit=codes.append, **SMALL) as dog:
        timed_steps(dog)
        with watchdog.phase("checkpoint save", follows=work):
            threading.Thread(target=hung_call, args=(-5.0,), daemon=True).start()
            t0 = time.monotonic()
            while not codes and time.monotonic() - t0 < 5:
                time.sleep(0.05)
    assert codes == [202] and 0.4 <= time.monotonic() - t0 < 2.0  # the step-based limit, the work's code


def test_a_measured_phase_at_start_up_is_held_to_the_floor_not_the_ceiling(capsys):
    """A rank waiting for rank 0's load while the run starts (no step timed yet, inside the start-up's
    ceiling): the wait beats while rank 0 lives, so once the beats stop the floor applies, not the
    ceiling; a load that follows its work gets the floor between moves, and its call its allowance.
    Outside such phases the start-up keeps the ceiling."""
    import threading

    codes = []
    with Watchdog(30.0, exit=codes.append, **SMALL) as dog:
        assert dog.limit_s == 30.0  # the start-up: a ceiling phase
        with watchdog.phase("checkpoint load: waiting for rank 0", measured=True):
            assert dog.limit_s == 0.4
            for _ in range(15):  # 1.5 s of beats: rank 0 lives
                time.sleep(0.1)
                watchdog.beat()
            t0 = time.monotonic()
            while not codes and time.monotonic() - t0 < 5:
                time.sleep(0.05)
        assert dog.limit_s == 30.0
    assert codes == [EXIT_HUNG] and 0.4 <= time.monotonic() - t0 < 2.0
    err = capsys.readouterr().err
    assert "phase 'checkpoint load: waiting for rank 0'" in err and "at least 0.4 s, no step timed yet" in err

    codes.clear()
    work = watchdog.Work("checkpoint.dir has not answered", code=202)

    def load():
        for _ in range(15):  # chunks for 1.5 s, then one call allowed 1.5 s that does not answer
            time.sleep(0.1)
            work.moved()
        with work.allowing(1.5):
            time.sleep(30)

    with Watchdog(30.0, exit=codes.append, **SMALL):
        with watchdog.phase("checkpoint load", follows=work):
            t0 = time.monotonic()
            threading.Thread(target=load, daemon=True).start()
            while not codes and time.monotonic() - t0 < 8:
                time.sleep(0.05)
    assert codes == [202] and 2.9 <= time.monotonic() - t0 < 4.5, time.monotonic() - t0


def test_a_step_that_waited_in_a_collective_for_the_other_ranks_work_is_not_timed():
    """A step in which this rank waited in a collective while a peer worked (the peer's shard copy)
    measures the peer's wait, not this rank's speed: timed, it would raise the limit to the
    ceiling for the next 20 steps. The peer's work outside a collective changes nothing."""
    from gpt2.watchdog import FLOOR_S, STEP_FACTOR, Watchdog

    dog = Watchdog(600)
    dog.steps(before=[0.5, 0.5, 0.5])
    dog.peers_worked(time.monotonic())  # not in a collective: this rank's own step
    dog.step_done(4.0)
    assert dog.limit_s == STEP_FACTOR * 4.0
    with dog.in_collective():
        dog.peers_worked(time.monotonic())
    dog.step_done(45.0)
    assert dog.limit_s == STEP_FACTOR * 4.0  # not 600
    dog.step_done(0.5)
    assert dog.limit_s == STEP_FACTOR * 4.0 and len(dog.recent) == 5 and FLOOR_S < dog.limit_s
