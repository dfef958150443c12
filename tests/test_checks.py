"""Tests of aot_model.checks: integers accepted as Python ints, bools and non-integers refused."""

import re

import numpy as np
import pytest

from aot_model.checks import check_choice, check_int, is_int


def test_is_int_refuses_bools_and_takes_numpy_only_when_asked():
    assert is_int(3) and is_int(-2)
    assert not is_int(True) and not is_int(False)
    assert not is_int(np.int64(3))
    assert is_int(np.int64(3), numpy=True) and is_int(np.uint8(3), numpy=True)
    assert not is_int(np.bool_(True), numpy=True)
    assert not any(is_int(v, numpy=True) for v in (3.0, "3", None, np.float32(3)))


def test_check_int_returns_a_python_int():
    assert check_int("n", 5, 5) == 5
    value = check_int("n", np.int32(7), 0, numpy=True)
    assert value == 7 and type(value) is int


@pytest.mark.parametrize(
    ("value", "kwargs", "message"),
    [
        (0, {}, "count must be an int >= 1, got 0"),
        (True, {}, "count must be an int >= 1, got True"),
        (2.0, {}, "count must be an int >= 1, got 2.0"),
        (np.int64(4), {}, "count must be an int >= 1, got np.int64(4)"),
        (0, {"reason": "one per rank"}, "count must be an int >= 1 (one per rank), got 0"),
    ],
)
def test_check_int_names_the_parameter_and_bound(value, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_int("count", value, 1, **kwargs)


def test_check_choice_names_the_parameter_and_the_allowed_values():
    check_choice("solver", "lap", ("scipy", "lap"))
    expected = r"solver must be one of \('scipy', 'lap'\), got 'auction'"
    with pytest.raises(ValueError, match=expected):
        check_choice("solver", "auction", ["scipy", "lap"])
