"""Big YAML texts are parsed in a child process, where they hold nobody's interpreter lock.

libyaml's parser keeps the interpreter lock for seconds at a stretch on a sidecar of tens of
thousands of prompts (measured: a thread waited 2.3 s at once while another parsed 40 000
prompts), so parsing in a background thread still stopped the daemon's heartbeat. A child
process parses and sends the mapping back as JSON. Whatever the child cannot do the same way
(a syntax error, values JSON cannot carry, anchors, a timeout) is parsed here after all, so the
result and every error message are exactly those of ``yaml.load``.

A key twice in one mapping (``prompts:`` twice) is refused (``DuplicateKey``), here and in the
child, rather than resolved silently to the last one: sidecars and the config file alike.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

#: Below this, starting a child costs more than the parse it would spare.
CHILD_MIN_BYTES = 64 * 1024
_CHILD_SECONDS = 60

# Anchors and aliases may expand exponentially in JSON (a "billion laughs"), so texts with
# them never go to the child.
# The child imports this module from the same tree (isolated mode ignores PYTHONPATH).
_CHILD = """
import json, sys, yaml
sys.path.insert(0, sys.argv[1])
from samwatch.yaml_child import unique_keys
loader = unique_keys(getattr(yaml, "CSafeLoader", yaml.SafeLoader))
json.dump(yaml.load(sys.stdin.buffer.read(), Loader=loader), sys.stdout, allow_nan=True)
"""
_TREE = str(Path(__file__).resolve().parent.parent)


class DuplicateKey(ConstructorError):
    """``key`` appears twice in one mapping; ``line`` (1-based) is where it appears again."""

    def __init__(self, key: Any, mark: Any) -> None:
        self.key, self.line = key, mark.line + 1
        super().__init__(None, None, f"the key {key!r} appears twice in one mapping", mark)


@functools.cache
def unique_keys(loader: type) -> type:
    """``loader`` refusing a key twice in one mapping (merged ``<<:`` keys may be overridden)."""

    class UniqueKeys(loader):  # type: ignore[misc, valid-type]
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: set[tuple[str, str]] = set()
                for key_node, _ in node.value:
                    if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = (key_node.tag, key_node.value)
                    if key in seen:
                        raise DuplicateKey(key_node.value, key_node.start_mark)
                    seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeys


def load_yaml(text: str | bytes, loader: type) -> Any:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    if len(raw) >= CHILD_MIN_BYTES and b"&" not in raw:
        try:
            child = subprocess.run(
                [sys.executable, "-I", "-c", _CHILD, _TREE], input=raw, capture_output=True, timeout=_CHILD_SECONDS,
            )
            if child.returncode == 0:
                return json.loads(child.stdout)
        except (OSError, subprocess.SubprocessError, ValueError, RecursionError):
            pass
    return yaml.load(text, Loader=unique_keys(loader))
