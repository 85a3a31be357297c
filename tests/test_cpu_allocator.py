"""utils.misc.keep_freed_cpu_memory: glibc's malloc keeps freed blocks of up to 32 MiB (CPU inference).

Checked by what malloc does, in a fresh process each (the setting is process-wide): a 16 MiB tensor is mmapped
by default (glibc's threshold starts at 128 KiB) and comes from the heap once the setting is in, and the freed
heap is not trimmed."""
import ctypes
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r'''
import ctypes, sys, json
import torch
from utils.misc import keep_freed_cpu_memory
took = keep_freed_cpu_memory() if sys.argv[1] == 'keep' else None

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ('arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks',
                                               'fsmblks', 'uordblks', 'fordblks', 'keepcost')]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
before = mallinfo2().hblkhd
t = torch.empty(16 << 20, dtype=torch.uint8)
t.fill_(1)
mapped = mallinfo2().hblkhd - before  # bytes mmapped for this tensor
del t
print(json.dumps({'took': took, 'mapped_mib': mapped / 2 ** 20, 'free_heap_mib': mallinfo2().fordblks / 2 ** 20}))
'''


def _probe(mode):
    out = subprocess.run([sys.executable, '-c', PROBE, mode], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _has_mallinfo2():
    try:
        return sys.platform.startswith('linux') and hasattr(ctypes.CDLL(None), 'mallinfo2')
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallinfo2(), reason='needs glibc >= 2.33 (mallinfo2)')
def test_freed_blocks_are_kept_in_the_heap_only_when_asked():
    default, kept = _probe('default'), _probe('keep')
    assert default['mapped_mib'] >= 16  # glibc's default: a 16 MiB block is its own mmap, unmapped on free
    assert kept['took'] is True
    assert kept['mapped_mib'] == 0 and kept['free_heap_mib'] >= 16  # from the heap, and kept there once freed


def test_it_does_nothing_off_linux(monkeypatch):
    from utils import misc
    monkeypatch.setattr(misc.sys, 'platform', 'darwin')
    assert misc.keep_freed_cpu_memory() is False
