from __future__ import annotations

import pytest

# torch and onnx warn about their own internals; tests here check Omni, not them.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")
