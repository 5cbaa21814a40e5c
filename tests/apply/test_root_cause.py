from __future__ import annotations

import signal

import pytest

from vdeploy.rollout import parse_duration, root_cause

TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'


@pytest.mark.parametrize(
    ("log", "expected"),
    [
        (TRACEBACK + "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", "CUDA out of memory"),
        (
            TRACEBACK + "ValueError: Bfloat16 is only supported on GPUs with compute capability of at least 8.0. "
            "Your Tesla T4 GPU has compute capability 7.5.",
            "set dtype: float16",
        ),
        (
            TRACEBACK + "FileNotFoundError: [Errno 2] No such file or directory: '/models/missing.gguf'",
            "model or file not found: /models/missing.gguf",
        ),
        (
            "ERROR:    [Errno 98] error while attempting to bind on address ('127.0.0.1', 8000): address already in use",
            "port already in use",
        ),
        (
            TRACEBACK + "ValueError: Model architectures ['MambaForCausalLM'] are not supported for now.",
            "model architecture not supported: architectures ['MambaForCausalLM']",
        ),
        (TRACEBACK + "ModuleNotFoundError: No module named 'gguf'", "missing Python package: gguf"),
        (TRACEBACK + "RuntimeError: something nobody planned for\n", "RuntimeError: something nobody planned for"),
    ],
)
def test_root_cause_names_the_failure(log: str, expected: str) -> None:
    assert expected in root_cause("INFO loading model\n" + log, returncode=1)


def test_root_cause_without_a_log_uses_the_exit_status() -> None:
    assert "SIGKILL" in root_cause("INFO loading weights\n", returncode=-signal.SIGKILL)
    assert "status 3" in root_cause("", returncode=3)


def test_latest_error_wins_over_older_output() -> None:
    log = TRACEBACK + "KeyError: 'old'\n" + TRACEBACK + "TypeError: the new one\n"
    assert root_cause(log, 1) == "TypeError: the new one"


@pytest.mark.parametrize(
    ("value", "seconds"), [(None, 600), (90, 90), ("90", 90), ("90s", 90), ("5m", 300), ("1h", 3600)]
)
def test_parse_duration(value, seconds) -> None:
    assert parse_duration(value, default=600) == seconds


def test_parse_duration_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon", default=1)
