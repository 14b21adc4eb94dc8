"""SIGTERM as a graceful stop (rainforest.signals), on this process's real signal handlers."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from rainforest.signals import graceful_stop


def test_sigterm_raises_keyboard_interrupt_inside_and_the_old_handler_is_back_after():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), graceful_stop(interrupt=True):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(10_000_000):  # the handler runs between bytecodes, well before the end
            pass
    assert signal.getsignal(signal.SIGTERM) is before


def test_flag_mode_records_sigterm_and_ctrl_c_and_the_work_goes_on():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with graceful_stop(interrupt=False, also_ctrl_c=True) as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])  # a syscall: pending handlers run
        assert (stop.requested, stop.reason) == (True, "SIGTERM")
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: only the flag
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        assert stop.reason == "SIGINT"
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_without_ctrl_c_flag_mode_leaves_sigint_alone():
    before = signal.getsignal(signal.SIGINT)
    with graceful_stop(interrupt=False):
        assert signal.getsignal(signal.SIGINT) is before
        assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, signal.SIG_IGN)


def test_off_the_main_thread_nothing_is_installed():
    seen = {}

    def worker():
        before = signal.getsignal(signal.SIGTERM)
        with graceful_stop(interrupt=False) as stop:
            seen["unchanged"] = signal.getsignal(signal.SIGTERM) is before
            seen["requested"] = stop.requested

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert seen == {"unchanged": True, "requested": False}
