"""The on-disk cache of measured fast-path choices (``models.fast_path_select``), one JSON file per user.

Where: ``$SWIN_FAST_PATHS_CACHE`` (a file path) if set, else ``$XDG_CACHE_HOME/swin_fast_paths/choices.json``
(``~/.cache/...`` by default). Per user rather than per output folder: the timings belong to the machine, so a
new run of the same model on the same machine (another output folder, another tag) reuses them; a resumed run
does not read the cache at all but the choice recorded in its checkpoint.

Keyed by the CPU (model name and a hash of its feature flags, from ``/proc/cpuinfo``; ``platform`` elsewhere),
the torch version, the thread count, the device type, the dtype and the caller's shape signature. Writes are
atomic (temp file + rename); an unreadable or foreign file is ignored (and rewritten), never trusted: only
``{mode: {path: bool}}`` entries are read back, and the caller validates the names.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
from typing import Any, Dict, Optional

ENV_VAR = 'SWIN_FAST_PATHS_CACHE'


def cache_path(environ=os.environ) -> str:
    """The cache file this process reads and writes (see the module doc)."""
    if environ.get(ENV_VAR):
        return environ[ENV_VAR]
    base = environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'swin_fast_paths', 'choices.json')


def cpu_identity(cpuinfo: str = '/proc/cpuinfo') -> Dict[str, str]:
    """``{'model': name, 'flags': short hash of the sorted flags}``; ``platform``'s strings without /proc."""
    model, flags = '', ''
    try:
        with open(cpuinfo, encoding='utf-8', errors='replace') as f:
            for line in f:
                key, _, value = line.partition(':')
                key = key.strip()
                if key in ('model name', 'Model', 'cpu model') and not model:
                    model = value.strip()
                elif key in ('flags', 'Features') and not flags:
                    flags = ' '.join(sorted(value.split()))
                if model and flags:
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine()
    return {'model': model, 'machine': platform.machine(),
            'flags': hashlib.sha1(flags.encode()).hexdigest()[:12] if flags else ''}


def cache_key(parts: Dict[str, Any]) -> str:
    """A stable string key of ``parts`` (JSON with sorted keys)."""
    return json.dumps(parts, sort_keys=True, separators=(',', ':'))


def _read(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding='utf-8') as f:
            content = json.load(f)
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def lookup(key: str, path: Optional[str] = None) -> Optional[Dict[str, Dict[str, bool]]]:
    """The cached choices for ``key``, or None."""
    entry = _read(path or cache_path()).get(key)
    if not isinstance(entry, dict) or not isinstance(entry.get('choices'), dict):
        return None
    choices = entry['choices']
    if not all(isinstance(v, dict) and all(isinstance(b, bool) for b in v.values()) for v in choices.values()):
        return None
    return choices


def store(key: str, choices: Dict[str, Dict[str, bool]], timings: Dict[str, Any], path: Optional[str] = None) -> str:
    """Add (or replace) ``key``'s entry; returns the file written. A file that cannot be written is skipped
    (returns ''): the cache saves time, it is not needed for correctness."""
    path = path or cache_path()
    content = _read(path)
    content[key] = {'choices': choices, 'timings': timings}
    try:
        os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or '.', prefix='.choices.', suffix='.tmp')
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            json.dump(content, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        return ''
    return path
