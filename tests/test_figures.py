"""mnist/figures.py: Slurm's times, memory sizes and states, read and written in one place."""
import pytest

from mnist import figures
from mnist.launch import resources


@pytest.mark.parametrize("text, seconds", [
    ("90", 5400), ("5:00", 300), ("0:5:0", 300), ("1:02:03", 3723), ("2-0", 172800), ("1-02:03", 93780),
    ("1-02:03:04", 93784), ("01:02.345", 62.345), ("00:00:01.5", 1.5), (" 0:15:0 ", 900),
])
def test_a_slurm_time_reads_as_seconds(text, seconds):
    assert figures.duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["UNLIMITED", "N/A", "", "Partition_Limit", "5 minutes", "1:2:3:4", True])
def test_what_is_no_slurm_time_reads_as_none(text):
    assert figures.duration_s(text) is None


@pytest.mark.parametrize("seconds, shown, limit", [
    (59, "0:59", "0:00:59"), (300, "5:00", "0:05:00"), (3723, "1:02:03", "1:02:03"),
    (93784, "1-02:03:04", "1-02:03:04"),
])
def test_seconds_show_as_squeue_does_and_as_a_limit_that_reads_back(seconds, shown, limit):
    assert figures.clock(seconds) == shown
    assert figures.limit_text(seconds) == limit
    assert figures.duration_s(limit) == seconds == resources.time_seconds(limit)


def test_a_limit_is_rounded_up_never_down():
    assert figures.limit_text(299.2) == "0:05:00"


@pytest.mark.parametrize("text, unit, n", [
    ("806660K", "", 806660 * 2**10), ("2G", "", 2 * 2**30), ("100", "M", 100 * 2**20), ("0", "", 0),
    ("1.5Gn", "", int(1.5 * 2**30)), ("3g", "", 3 * 2**30),
])
def test_a_slurm_memory_figure_reads_as_bytes(text, unit, n):
    assert figures.memory_bytes(text, unit) == n


def test_what_is_no_memory_figure_reads_as_none():
    assert figures.memory_bytes("3X") is None and figures.memory_bytes("") is None


@pytest.mark.parametrize("n, up, at_most", [
    (698 * 2**20, "768M", "698M"), (872 * 2**20, "1G", "872M"), (1000 * 2**20 * 1.2, "1280M", "1200M"),
    (8 * 2**30, "8G", "8G"), (7800 * 2**20, "7936M", "7800M"),
])
def test_bytes_become_a_request_rounded_up_or_a_cap_rounded_down(n, up, at_most):
    assert figures.memory_text(n) == up and figures.memory_bytes(up) >= n
    assert figures.memory_text(n, at_most=True) == at_most and figures.memory_bytes(at_most, "M") <= n
    assert resources.memory(up) == up  # what sbatch takes as it is


def test_bytes_for_a_reader_and_a_state_without_its_reason():
    assert [figures.human_bytes(n) for n in (None, 512, 698 * 2**20, int(1.5 * 2**30), 12 * 2**30)] == \
        ["?", "512B", "698M", "1.5G", "12G"]
    assert figures.state("CANCELLED by 1000") == "CANCELLED" and figures.state("RUNNING") == "RUNNING"
    assert figures.state("") == ""
