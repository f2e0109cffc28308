"""One program written in NIXL's style, run on kvxfer.nixl and, where
nixl-cu12 is installed, on NIXL itself: the same results."""

import json
import os
import subprocess
import sys

import pytest

PROGRAM = os.path.join(os.path.dirname(__file__), "nixl_style_program.py")

EXPECTED = {
    "descs_roundtrip": 2,
    "read": "DONE",
    "remote": ["bytes", "target"],
    "repost": "DONE",
    "target_exit": 0,
    "target_notifs": [
        ["str", "initiator", "bytes", "bye"],
        ["str", "initiator", "bytes", "read-1"],
        ["str", "initiator", "bytes", "read-1"],
        ["str", "initiator", "bytes", "write-1"],
    ],
    "write": "DONE",
    "write_telemetry": [1 << 20, 1],
}


def run(python, api):
    env = dict(os.environ, NIXL_LOG_LEVEL="WARN")
    out = subprocess.run([python, PROGRAM, "--api", api], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def check(result):
    for key, want in EXPECTED.items():
        assert result[key] == want, key
    assert result["read_digest"] == result["expected_read_digest"]
    assert result["repost_digest"] == result["expected_read_digest"]
    assert result["target_sink_digest"] == result["expected_sink_digest"]


def nixl_python():
    """An interpreter with NIXL's Python package: this one, KVXFER_NIXL_PYTHON,
    or the environment scripts/nixl-bench.sh creates."""
    venv = os.environ.get("KVXFER_NIXL_VENV",
                          os.path.expanduser("~/.cache/kvxfer/nixl-venv"))
    for py in (sys.executable, os.environ.get("KVXFER_NIXL_PYTHON"),
               os.path.join(venv, "bin", "python")):
        if py and os.path.exists(py) and subprocess.run(
                [py, "-c", "import importlib.util as u, sys; "
                           "sys.exit(not (u.find_spec('nixl') or u.find_spec('nixl_cu12')))"],
                capture_output=True).returncode == 0:
            return py
    return None


@pytest.fixture(scope="module")
def kvxfer_result():
    return run(sys.executable, "kvxfer")


def test_nixl_style_program_on_kvxfer(kvxfer_result):
    check(kvxfer_result)


def test_same_results_on_nixl(kvxfer_result):
    py = nixl_python()
    if py is None:
        pytest.skip("NIXL's Python package (nixl-cu12) is not installed")
    nixl_result = run(py, "nixl")
    check(nixl_result)
    assert nixl_result == kvxfer_result
