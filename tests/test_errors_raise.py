"""A failed check inside the extension must raise a Python error naming the argument, never
kill the process.

On one GPU machine every failing TORCH_CHECK in robprune_fast killed the process with a
segmentation fault (scripts/throw_check.py probes the cause). The table of bad inputs
(tests/helpers/op_error_cases.py: every op, called through torch.ops.robprune_fast so that the C++ checks
fire) runs first as a whole in one subprocess, on the CPU and, when there is one, on CUDA: the
test fails if the subprocess dies, or if any case does not raise a RuntimeError with its
message. Then each case runs in process, for a report per case.
"""
import json
import os
import re
import subprocess
import sys

import pytest

from tests.helpers.ops import DEVICES
from tests.helpers.op_error_cases import CASES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_failed_check_raises_in_a_subprocess():
    devices = [str(d) for d in DEVICES]
    proc = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "tests.helpers.op_error_cases",
                           *devices], capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = proc.stdout.splitlines()
    started = [line.split(" ", 1)[1] for line in lines if line.startswith("START ")]
    assert proc.returncode == 0, (
        f"the subprocess died (returncode {proc.returncode}) in case {started[-1] if started else None}:\n"
        f"{proc.stderr[-3000:]}")
    results = [json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")]
    results = {r["key"]: r for r in results}
    wrong = []
    for device in devices:
        for case in CASES:
            key = f"{case.id}@{device}"
            got = results.get(key)
            if got is None or got["error"] != "RuntimeError" or not re.search(case.match, got["message"]):
                wrong.append(f"{key}: expected a RuntimeError matching {case.match!r}, got "
                             f"{None if got is None else (got['error'], got['message'][:300])}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_failed_check_raises(case, device):
    with pytest.raises(RuntimeError, match=case.match):
        case.call(str(device))
