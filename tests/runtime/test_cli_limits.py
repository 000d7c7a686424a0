from __future__ import annotations

import subprocess
import sys

CODE = """
import resource
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 512))
from omni_runtime.serve import _raise_descriptor_limit
_raise_descriptor_limit()
print(resource.getrlimit(resource.RLIMIT_NOFILE))
"""


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one() -> None:
    result = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True)
    assert result.stdout.strip() == "(512, 512)", result.stderr
