"""The unit / integration split (pytest.ini, tests/conftest.py): a test not marked integration is
marked unit, and a unit test cannot start a subprocess."""

import subprocess

import pytest

MESSAGE = "a unit test must not start a process group / subprocess; mark it integration"


def test_a_unit_test_is_marked_unit_and_cannot_start_a_subprocess(request):
    assert request.node.get_closest_marker("unit") is not None  # added by the conftest hook
    assert request.node.get_closest_marker("integration") is None
    with pytest.raises(BaseException, match=MESSAGE) as raised:  # not an Exception: see tests/conftest.py
        subprocess.Popen(["true"])
    assert type(raised.value).__name__ == "UnitTestStartedProcess"
