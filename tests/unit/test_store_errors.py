"""Which Redis refusals are about one key and which are about Redis as a whole (``worker/redis_store.py``).

Each error is built from the line Redis sends, by redis-py's own parser, so the classes and messages are those the
store meets in a pipeline's results."""

from __future__ import annotations

import pytest
from redis._parsers.base import BaseParser

from worker.ports import StoreUnavailable
from worker.redis_store import _entry_error, _existing

SCRIPT = " script: 7768144aff75a9d63d8ed40ac7508d4fae24963c, on @user_script:5."  # how a refusal inside Lua reads

WHOLE_STORE = [
    "OOM command not allowed when used memory > 'maxmemory'.",
    "READONLY You can't write against a read only replica.",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk.",
    "NOAUTH Authentication required.",
    "LOADING Redis is loading the dataset in memory",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "MOVED 3999 127.0.0.1:6381",
    "ASK 3999 127.0.0.1:6381",
    "CROSSSLOT Keys in request don't hash to the same slot",
    "CLUSTERDOWN The cluster is down",
    "NOPERM this user has no permissions to run the 'evalsha' command",
]
WRONGTYPE = "WRONGTYPE Operation against a key holding the wrong kind of value"


def _name(line: str) -> str:
    return line.split(maxsplit=1)[0] + (" in a script" if SCRIPT in line else "")


# A cluster redirects (MOVED, ASK) by a script's KEYS before it runs, so those never come from inside one.
IN_A_SCRIPT = [line + SCRIPT for line in WHOLE_STORE if not line.startswith(("MOVED", "ASK"))]


@pytest.mark.parametrize("line", WHOLE_STORE + IN_A_SCRIPT, ids=_name)
def test_a_refusal_by_redis_as_a_whole_fails_the_round(line: str) -> None:
    """Before: every one of these parked the item it met, so a full or read-only Redis parked the whole backlog."""
    error = BaseParser.parse_error(line)
    with pytest.raises(StoreUnavailable) as info:
        _entry_error(error)
    assert type(error).__name__ in str(info.value)  # the operator reads what Redis said
    with pytest.raises(StoreUnavailable):
        _existing(error)


@pytest.mark.parametrize("line", [WRONGTYPE, WRONGTYPE + SCRIPT], ids=_name)
def test_a_key_of_another_type_fails_only_its_own_item(line: str) -> None:
    error = BaseParser.parse_error(line)
    assert _entry_error(error) == f"redis refused the write to this key: {line}"
    assert _existing(error).error == f"redis refused to read this key: {line}"


def test_script_results_and_unreadable_fields_of_ours_are_not_errors() -> None:
    assert _entry_error(1) is None and _entry_error(0) is None  # written; or kept, a later round's vector
    have = _existing([b"abc", b"gemini-embedding-001", b"n/a"])
    assert have.error is None and have.dimensions is None and have.text_hash == "abc"
