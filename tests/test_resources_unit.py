"""Memory readings the scale benchmark and the build plan rest on, on this real process."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from qwen_image_trt.core.resources import PeakRSS, available_memory_bytes, rss_anon_bytes, rss_bytes


def test_rss_of_this_process_another_and_a_finished_one():
    assert rss_bytes() > 10 * 2**20
    assert abs(rss_bytes(os.getpid()) - rss_bytes()) < 64 * 2**20
    child = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "up\n"  # the interpreter is running, not still being exec'd
        assert rss_bytes(child.pid) > 2**20
    finally:
        child.kill()
        child.wait()
    assert rss_bytes(child.pid) == 0  # gone: 0, not an error


def test_anonymous_memory_is_part_of_rss_and_its_peak_sees_an_allocation():
    assert 0 < rss_anon_bytes() <= rss_bytes()
    assert 0 < available_memory_bytes()
    with PeakRSS(interval_s=0.01, sample=rss_anon_bytes) as anon:
        before = anon.peak
        size = 200 * 2**20
        block = bytearray(size)
        block[::4096] = b"\x01" * len(range(0, size, 4096))  # touch every page: anonymous memory really used
        time.sleep(0.1)
        del block
    assert anon.peak - before > 150 * 2**20
