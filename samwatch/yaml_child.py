"""Big YAML texts are parsed in a child process, where they hold nobody's interpreter lock.

libyaml's parser keeps the interpreter lock for seconds at a stretch on a sidecar of tens of
thousands of prompts (measured: a thread waited 2.3 s at once while another parsed 40 000
prompts), so parsing in a background thread still stopped the daemon's heartbeat. A child
process parses and sends the mapping back as JSON. Whatever the child cannot do the same way
(a syntax error, values JSON cannot carry, anchors, a timeout) is parsed here after all, so the
result and every error message are exactly those of ``yaml.load``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import yaml

#: Below this, starting a child costs more than the parse it would spare.
CHILD_MIN_BYTES = 64 * 1024
_CHILD_SECONDS = 60

# Anchors and aliases may expand exponentially in JSON (a "billion laughs"), so texts with
# them never go to the child.
_CHILD = """
import json, sys, yaml
data = yaml.load(sys.stdin.buffer.read(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
json.dump(data, sys.stdout, allow_nan=True)
"""


def load_yaml(text: str | bytes, loader: type) -> Any:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    if len(raw) >= CHILD_MIN_BYTES and b"&" not in raw:
        try:
            child = subprocess.run(
                [sys.executable, "-I", "-c", _CHILD], input=raw, capture_output=True, timeout=_CHILD_SECONDS,
            )
            if child.returncode == 0:
                return json.loads(child.stdout)
        except (OSError, subprocess.SubprocessError, ValueError, RecursionError):
            pass
    return yaml.load(text, Loader=loader)
