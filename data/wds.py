"""``DATA.DATASET wds``: WebDataset tar shards (the ``webdataset`` package opens them), read in order, exactly.

A split is a list of tar shards, each holding samples ``{key}.jpg|jpeg|png|webp`` + ``{key}.cls`` (the label as
text), as in the public ImageNet shards. The index file ``<DATA.DATA_PATH>/<name>.index.json``
(``scripts/pack_wds.py`` writes it) gives each shard's sample count and size, so every rank knows the epoch's
length before reading, and a missing or truncated local shard is an error that names it before training.

How an epoch is laid out (``EpochLayout``, a pure function of SEED, epoch, world size, DATA.BATCH_SIZE and
DATA.NUM_WORKERS):

1. The shards are put in an order drawn from (SEED, epoch) (validation: their listed order) and their samples
   concatenated.
2. Training: each rank takes a contiguous run of ``L = (N // (world * B)) * B`` samples of that concatenation,
   so every rank runs the same number of full batches; the last ``N - world * L`` samples (fewer than
   ``world * B``, in whichever shard comes last this epoch) sit the epoch out. Validation: contiguous blocks
   whose sizes differ by at most one, every sample exactly once, no padding.
3. A rank's run is cut into ``S = max(1, DATA.NUM_WORKERS)`` streams: stream ``s`` serves batches
   ``s, s + S, s + 2S, ...``, which is how the DataLoader hands batches to its workers, so each worker reads one
   contiguous stretch of shards from start to end. Training streams pass through a shuffle buffer of
   ``DATA.WDS_SHUFFLE`` samples seeded from (SEED, epoch, rank, stream).

The dataset is map-style: the sampler (``WdsTrainSampler``) yields the positions of the rank's run as
``SampleKey``s, and the dataset turns position -> (stream, place in stream) -> sample by reading the stream
forward (a process keeps one reader per stream it serves). So the samplers' contract holds unchanged: the
engine's ``set_epoch``, ``loader_from`` (a mid-epoch resume re-reads the trained part of each stream and
discards it), the per-sample augmentation seeds and the exact validation sharding.

Damaged samples (an unreadable image, a missing or bad ``.cls``) follow the broken-image policy of
``data.datasets`` (training: the next sample of the stream stands in; validation: dropped; both counted).

Layer: over ``data.datasets`` and ``data.seeding``, under the samplers.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import struct
import zlib
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .datasets import (DECODE_ERRORS, MAX_SUBSTITUTE_TRIES, BROKEN_POLICIES, BrokenImageCounter, BrokenImageError,
                       DatasetLayoutError, decode_image, require_source)
from .seeding import SampleKey, key_maker, seeded_rngs

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
LABEL_EXTENSION = 'cls'
READ_EXTENSIONS = IMAGE_EXTENSIONS + (LABEL_EXTENSION,)  # the parts a reader needs; others are skipped
INDEX_SUFFIX = '.index.json'
INDEX_FORMAT = 'swin-wds-index/1'
# Recent samples a stream reader keeps, so that a substitute (the next sample) and the batch after it need no
# re-read; older places re-open the stream.
READER_WINDOW = 256
# Shard files a stream reader keeps open for the deferred image reads (``ShardFiles``): a shuffle buffer spans a
# few consecutive shards of its stream; one that falls out is re-opened if a later read needs it.
OPEN_SHARD_FILES = 8


class MemberSpan(NamedTuple):
    """Where a tar member's data lies in a local shard file (``url``: which file; ``iter_shard`` sets it)."""
    offset: int
    size: int
    url: str = ''


Raw = Tuple[str, Dict[str, bytes]]  # (sample key, {extension: bytes})
# As read from a shard: a local shard's images are spans (read when the sample is served), the rest bytes.
LazyRaw = Tuple[str, Dict[str, Union[bytes, MemberSpan]]]


class WdsShardError(DatasetLayoutError):
    """A shard that is missing, truncated or holds other samples than its index says; the message names it."""


# ----------------------------------------------------------------------------- the index and the shard list

def is_local(url: str) -> bool:
    return '://' not in url and not url.startswith('pipe:')


def join_url(root: str, name: str) -> str:
    """A file's location: ``name`` as given when it is absolute or a URL; else under ``root``: a folder, a URL
    prefix, or a ``pipe:`` command in which ``{}`` stands for the file name (``pipe:aws s3 cp s3://b/wds/{} -``)."""
    if not is_local(name) or os.path.isabs(name):
        return name
    if root.startswith('pipe:'):
        if '{}' not in root:
            raise DatasetLayoutError(f"DATA.DATA_PATH {root!r}: a pipe: command needs '{{}}' where the file name "
                                     f"goes, e.g. 'pipe:aws s3 cp s3://bucket/imagenet_wds/{{}} -'")
        return root.replace('{}', name)
    return f"{root.rstrip('/')}/{name}" if not is_local(root) else os.path.join(root, name)


def index_name(split: str) -> str:
    """The index file of a split given as a name (``train``) or a brace pattern (``train-{000..009}.tar``)."""
    stem = split.split('{')[0] if '{' in split else split
    if stem.endswith('.tar'):
        stem = stem[:-4]
    return stem.rstrip('-_.') + INDEX_SUFFIX


def read_index(root: str, split: str) -> List[Dict[str, Any]]:
    """The shards of ``split``: ``[{'url', 'samples', 'bytes' (None when unknown)}]`` in their listed order."""
    path = join_url(root, index_name(split))
    if is_local(path):
        if not os.path.isfile(path):
            raise DatasetLayoutError(
                f"WebDataset index not found: {path}; scripts/pack_wds.py writes it with the shards, and "
                f"'python scripts/pack_wds.py --index-only {root} --split {split}' counts existing shards once")
        with open(path, encoding='utf-8') as f:
            text = f.read()
    else:
        wds = require_source('webdataset', 'webdataset', 'wds')
        with wds.gopen(path) as f:
            text = f.read().decode('utf-8')
    try:
        index = json.loads(text)
        entries = [{'url': str(e['url']), 'samples': int(e['samples']),
                    'bytes': None if e.get('bytes') is None else int(e['bytes'])} for e in index['shards']]
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetLayoutError(f"{path}: not a WebDataset index ({INDEX_FORMAT}): {type(e).__name__}: {e}") from None
    if '{' in split or split.endswith('.tar'):  # a pattern picks (and orders) shards of the index
        braceexpand = require_source('braceexpand', 'braceexpand', 'wds')
        by_name = {os.path.basename(e['url']): e for e in entries}
        wanted = list(braceexpand.braceexpand(split))
        missing = [w for w in wanted if os.path.basename(w) not in by_name]
        if missing:
            raise DatasetLayoutError(f"{path} does not list {len(missing)} shards of {split!r}, e.g. {missing[:3]}")
        entries = [by_name[os.path.basename(w)] for w in wanted]
    if not entries or sum(e['samples'] for e in entries) == 0:
        raise DatasetLayoutError(f"{path}: the split {split!r} has no samples")
    for e in entries:
        e['url'] = join_url(root, e['url'])
    return entries


def check_local_shards(shards: Sequence[Dict[str, Any]]) -> None:
    """Every local shard exists and has the size its index records: else an error naming them."""
    missing = [s['url'] for s in shards if is_local(s['url']) and not os.path.isfile(s['url'])]
    if missing:
        raise WdsShardError(f"{len(missing)} WebDataset shards are missing, e.g. {missing[:3]}")
    for s in shards:
        if is_local(s['url']) and s['bytes'] is not None and os.path.getsize(s['url']) != s['bytes']:
            raise WdsShardError(f"shard {s['url']} has {os.path.getsize(s['url'])} bytes, its index says "
                                f"{s['bytes']}: truncated or rewritten; re-pack it or rewrite the index "
                                f"(scripts/pack_wds.py --index-only)")


# ----------------------------------------------------------------------------- reading shards

def split_member_name(name: str) -> Tuple[str, str]:
    """``dir/abc.def.jpg`` -> (``dir/abc``, ``def.jpg``): webdataset's rule (the key ends at the base name's
    first dot)."""
    directory, slash, base = name.rpartition('/')  # tar names use '/' on every system
    stem, _, ext = base.partition('.')
    return directory + slash + stem, ext.lower()


def open_shard(url: str) -> Any:
    if is_local(url):
        return open(url, 'rb')
    wds = require_source('webdataset', 'webdataset', 'wds')
    return wds.gopen(url)


# A hand-written tar reader, not ``tarfile``: for every member ``tarfile`` builds a ``TarInfo`` (15 us to parse a
# header into 20 fields) and an extracted-file wrapper, ~67 us a sample in all against ~17 us for a folder reader's
# open + read + close (docs/DATA.md "Speed per worker"); webdataset's own tar iterator is ``tarfile`` underneath.
# This one reads what a shard reader needs (name, size, type) with the checks ``tarfile`` makes (checksum, signed
# or unsigned; octal or base-256 sizes; ustar prefixes, GNU long names, pax ``path`` / ``size`` records) and is
# stricter where ``tarfile``'s stream mode silently ends an archive (a bad header or a partial block after the first
# member): that is a damaged shard, an error naming it.
TAR_BLOCK = 512
TAR_REGULAR = (b'0', b'\0', b'7')  # regular file, old-style regular file, contiguous file
TAR_NO_DATA = (b'1', b'2', b'3', b'4', b'5', b'6')  # links, devices, directories, FIFOs: no data blocks
TAR_PAX, TAR_PAX_GLOBAL, TAR_GNU_LONGNAME, TAR_GNU_LONGLINK, TAR_GNU_SPARSE = b'xX', b'g', b'L', b'K', b'S'
TAR_POSIX_MAGIC = b'ustar\x0000'
TAR_CHECKSUM = struct.Struct('148b8x356b')  # signed bytes, for the old tars that summed signed chars
TAR_SUM_PARTS = ((0, 148), (156, 412), (412, 512))  # a header less its checksum field, in runs of <= 256 bytes


class TarFormatError(ValueError):
    """A tar header or member that cannot be read (``iter_shard`` names the shard)."""


def tar_number(field: bytes) -> int:
    """A tar number field: octal text, or GNU base-256 (first byte 0x80, or 0xff for a negative number)."""
    if field[0] in (0o200, 0o377):
        n = int.from_bytes(field[1:], 'big')
        return n - 256 ** (len(field) - 1) if field[0] == 0o377 else n
    text = field.split(b'\0', 1)[0].strip()
    try:
        return int(text or b'0', 8)
    except ValueError:
        raise TarFormatError(f"invalid number field {field!r} in a tar header") from None


def unsigned_checksum(header: bytes) -> int:
    """A tar header's checksum: the sum of its bytes, the checksum field (bytes 148-155) counted as spaces.

    Summed with zlib's Adler-32 in C instead of Python's ``sum`` (4 us a header, two headers a sample): Adler-32's
    low half is 1 + the sum of the bytes modulo 65521, exact for up to 256 bytes (at most 256 * 255 = 65280)."""
    view = memoryview(header)
    return 256 + sum((zlib.adler32(view[a:b]) & 0xffff) - 1 for a, b in TAR_SUM_PARTS)


def tar_string(field: bytes) -> str:
    return field.split(b'\0', 1)[0].decode('utf-8', 'surrogateescape')


def pax_records(data: bytes) -> Dict[str, str]:
    """A pax extended header's ``"<length> <key>=<value>\\n"`` records."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b' ', pos)
        if space < 0:
            raise TarFormatError("invalid pax header: a record without a length")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError(f"invalid pax header: record length {data[pos:space]!r}") from None
        record = data[space + 1:pos + length]
        if length <= space - pos or not record.endswith(b'\n') or b'=' not in record:
            raise TarFormatError("invalid pax header: a malformed record")
        key, value = record[:-1].split(b'=', 1)
        records[key.decode('utf-8', 'surrogateescape')] = value.decode('utf-8', 'surrogateescape')
        pos += length
    return records


def read_exact(stream: Any, n: int) -> bytes:
    """``n`` bytes, one ``read`` for files (a pipe may return less: loop); short at the end of the stream."""
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b''.join(parts)


def iter_tar(stream: Any, keep: Optional[Callable[[str], bool]] = None,
             defer: Optional[Callable[[str], bool]] = None
             ) -> Iterator[Tuple[str, Union[bytes, MemberSpan, None]]]:
    """(name, data) of the regular files of a tar stream in order. ``keep`` is called once for each regular
    member, just before it is yielded: False gives data None and the bytes are not read (a seekable stream
    seeks past them). ``defer`` is called for each kept member when the stream is a seekable file: True gives
    data as a ``MemberSpan`` (where the bytes are; checked to lie within the file) and seeks past them.

    Raises ``TarFormatError`` for a bad header, an unsupported member (sparse files), or data cut short.
    """
    try:
        seekable = bool(stream.seekable())
        size_on_disk = os.fstat(stream.fileno()).st_size if seekable else 0
    except (AttributeError, OSError, ValueError):
        seekable = False
    global_pax: Dict[str, str] = {}
    pax: Dict[str, str] = {}
    long_name: Optional[str] = None
    offset = 0
    while True:
        header = read_exact(stream, TAR_BLOCK)
        if not header:
            if offset == 0:
                raise TarFormatError("empty file")
            return  # ends at a member boundary without the end-of-archive blocks: as tar itself reads it
        if len(header) != TAR_BLOCK:
            raise TarFormatError(f"truncated header at byte {offset}")
        if header.count(0) == TAR_BLOCK:
            return  # end-of-archive block
        checksum = tar_number(header[148:156])
        if checksum != unsigned_checksum(header) and checksum != 256 + sum(TAR_CHECKSUM.unpack_from(header)):
            raise TarFormatError(f"bad header checksum at byte {offset}")
        kind = header[156:157]
        extension = kind in TAR_PAX or kind in TAR_PAX_GLOBAL or kind in TAR_GNU_LONGNAME or kind in TAR_GNU_LONGLINK
        size = tar_number(header[124:136])
        if 'size' in pax and not extension:  # pax: the real size of a member too large for the octal field
            try:
                size = int(pax['size'])
            except ValueError:
                raise TarFormatError(f"invalid pax size {pax['size']!r}") from None
        if size < 0:
            raise TarFormatError(f"negative member size at byte {offset}")
        offset += TAR_BLOCK
        padded = -(-size // TAR_BLOCK) * TAR_BLOCK
        if extension:
            data = read_exact(stream, padded)
            if len(data) != padded:
                raise TarFormatError(f"data cut short at byte {offset + len(data)}")
            offset += padded
            if kind in TAR_GNU_LONGNAME:
                long_name = tar_string(data[:size])
            elif kind in TAR_PAX:
                pax = {**global_pax, **pax_records(data[:size])}
            elif kind in TAR_PAX_GLOBAL:
                global_pax.update(pax_records(data[:size]))
                pax = dict(global_pax)
            continue  # GNU long link names: nothing a reader of files needs
        if kind == TAR_GNU_SPARSE or (pax and any(k.startswith('GNU.sparse.') for k in pax)):
            raise TarFormatError(f"sparse member at byte {offset - TAR_BLOCK}: not supported in a shard")
        name = tar_string(header[:100])
        if long_name is not None:
            name = long_name
        elif header[257:265] == TAR_POSIX_MAGIC and header[345] != 0:
            name = tar_string(header[345:500]) + '/' + name  # ustar: long names are prefix / name
        name = pax.get('path', name)
        pax, long_name = dict(global_pax), None
        if kind in TAR_NO_DATA or (kind == b'\0' and name.endswith('/')):
            continue  # tar's rule: these carry no data blocks (a V7 directory is a regular file ending in '/')
        kept = kind in TAR_REGULAR and (keep is None or keep(name))
        if kept and not (seekable and defer is not None and defer(name)):
            data = read_exact(stream, size)
            pad = read_exact(stream, padded - size) if padded > size else b''
            if len(data) != size or len(pad) != padded - size:
                raise TarFormatError(f"member {name} cut short (at most {len(data)} of its {size} bytes)")
            offset += padded
            yield name, data
            continue
        if seekable:  # a skipped, deferred or unknown-type member: past it without reading (a file: its size
            if offset + padded > size_on_disk:  # says if it is all there)
                raise TarFormatError(f"member {name} cut short ({size_on_disk - offset} of its {size} bytes)")
            stream.seek(padded, os.SEEK_CUR)
        elif padded and len(read_exact(stream, padded)) != padded:
            raise TarFormatError(f"member {name} cut short")
        if kept:
            yield name, MemberSpan(offset, size)
        elif kind in TAR_REGULAR:
            yield name, None
        offset += padded


def iter_shard(url: str, keep: Optional[Sequence[str]] = None, skip: int = 0,
               defer: Sequence[str] = ()) -> Iterator[LazyRaw]:
    """The samples of one tar shard in order from sample ``skip``: members grouped by key; with ``keep``, only
    those extensions are read. Skipped samples and parts are not read (seeked past in a local file). In a local
    file the parts with a ``defer`` extension are not read either but given as ``MemberSpan``s (``ShardFiles``
    reads them). A damaged tar is a ``WdsShardError`` naming the shard."""
    wanted = None if keep is None else frozenset(keep)
    deferred = frozenset(defer)
    current: List[Any] = [None, '', -1]  # the last member's (key, extension, sample number): set by keep(), used below

    def keep_member(name: str) -> bool:
        k, ext = split_member_name(name)
        current[2] += k != current[0]
        current[0], current[1] = k, ext
        return current[2] >= skip and (wanted is None or ext in wanted)

    def defer_member(name: str) -> bool:
        return current[1] in deferred  # keep_member has just split this name

    try:
        with open_shard(url) as stream:
            key, parts = None, {}
            for _, data in iter_tar(stream, keep_member, defer_member if deferred else None):
                k, ext, n = current
                if n < skip:
                    continue
                if k != key:
                    if key is not None:
                        yield key, parts
                    key, parts = k, {}
                if isinstance(data, MemberSpan):
                    parts[ext] = MemberSpan(data.offset, data.size, url)
                elif data is not None:
                    parts[ext] = data
            if key is not None:
                yield key, parts
    except (TarFormatError, EOFError, OSError, zlib.error) as e:
        raise WdsShardError(f"shard {url} cannot be read to its end ({type(e).__name__}: {e}): missing or "
                            f"truncated; re-pack it (scripts/pack_wds.py --verify checks every shard)") from None


class ShardFiles:
    """Reads ``MemberSpan``s: the bytes of a deferred part, from a shard file it keeps open (the last
    ``OPEN_SHARD_FILES``; an older one is re-opened when needed).

    Why deferred: a shuffle buffer of ``DATA.WDS_SHUFFLE`` samples would otherwise hold every buffered sample's
    image (1000 ImageNet JPEGs: ~110 MB a worker, as much again in the reader's window); a span is read just
    before its decode, as the folder reader reads a file, at the same speed within 1%. ``os.pread``, not an
    ``mmap``: mapped pages would count in the worker's resident memory, and a shard cut short while mapped
    would end the worker with SIGBUS instead of this error naming it (docs/DATA.md "Speed per worker")."""

    def __init__(self) -> None:
        self.files: Dict[str, Any] = {}  # url -> unbuffered file, least recently used first

    def read(self, span: MemberSpan) -> bytes:
        try:
            file = self.files.pop(span.url, None)
            if file is None:
                file = open(span.url, 'rb', buffering=0)
            self.files[span.url] = file  # now the most recently used
            if len(self.files) > OPEN_SHARD_FILES:
                self.files.pop(next(iter(self.files))).close()
            data = os.pread(file.fileno(), span.size, span.offset)  # one system call; no shared file position
        except OSError as e:
            raise WdsShardError(f"shard {span.url} cannot be read ({type(e).__name__}: {e}): missing or "
                                f"re-written since its samples were listed") from None
        if len(data) != span.size:
            raise WdsShardError(f"shard {span.url} ends inside a member ({len(data)} of its {span.size} bytes at "
                                f"byte {span.offset}): truncated since its samples were listed")
        return data

    def resolve(self, raw: LazyRaw) -> Raw:
        """The sample with its spans read."""
        key, parts = raw
        if not any(isinstance(v, MemberSpan) for v in parts.values()):
            return raw  # type: ignore[return-value]  # no spans: bytes only
        return key, {e: self.read(v) if isinstance(v, MemberSpan) else v for e, v in parts.items()}

    def close(self) -> None:
        for file in self.files.values():
            file.close()
        self.files = {}

    def __del__(self) -> None:  # a dropped reader (another epoch, a restart) closes its files now
        self.close()


def shard_samples(url: str, skip: int, take: int, keep: Optional[Sequence[str]] = None,
                  defer: Sequence[str] = ()) -> Iterator[LazyRaw]:
    """Samples ``skip .. skip + take - 1`` of one shard (``keep``: the extensions to read; ``defer``: those
    given as spans, see ``iter_shard``); a shard that ends before them is an error naming it."""
    got = 0
    for raw in iter_shard(url, keep, skip, defer):
        yield raw
        got += 1
        if got == take:
            return
    raise WdsShardError(f"shard {url} ended after {skip + got} samples; its index promises at least {skip + take}: "
                        f"truncated or rewritten (scripts/pack_wds.py --verify)")


def shuffled(items: Iterator[LazyRaw], size: int, rng: np.random.Generator) -> Iterator[LazyRaw]:
    """A shuffle buffer of ``size``: fill it, then emit a random element and put the next item in its place."""
    buffer: List[LazyRaw] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = int(rng.integers(len(buffer)))
        yield buffer[i]
        buffer[i] = item
    while buffer:
        i = int(rng.integers(len(buffer)))
        buffer[i], buffer[-1] = buffer[-1], buffer[i]
        yield buffer.pop()


def stream_seed(*words: int) -> int:
    data = b''.join(int(w & ((1 << 64) - 1)).to_bytes(8, 'little') for w in words)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b'swin-wds').digest(), 'little')


# ----------------------------------------------------------------------------- the epoch's layout

class EpochLayout:
    """Which samples rank ``rank`` reads in an epoch, cut into streams (see the module's docstring)."""

    def __init__(self, counts: Sequence[int], order: Sequence[int], rank: int, world: int, batch_size: int,
                 streams: int, train: bool) -> None:
        total = sum(counts)
        if train:
            per_rank = (total // (world * batch_size)) * batch_size
            self.start, self.length = rank * per_rank, per_rank
        else:
            if world > total:
                raise DatasetLayoutError(f"{world} ranks but only {total} validation samples")
            base, extra = divmod(total, world)
            self.start, self.length = rank * base + min(rank, extra), base + (1 if rank < extra else 0)
        self.batch_size, self.streams = batch_size, streams
        self.order = list(order)
        self.counts = [counts[i] for i in self.order]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        batches = math.ceil(self.length / batch_size)
        sizes = [batch_size] * batches
        if batches:
            sizes[-1] = self.length - (batches - 1) * batch_size
        self.stream_lengths = [sum(sizes[s::streams]) for s in range(streams)]
        self.stream_starts = [self.start + sum(self.stream_lengths[:s]) for s in range(streams)]

    def locate(self, position: int) -> Tuple[int, int]:
        """Global position (as the sampler yields it) -> (stream, place in the stream)."""
        p = position - self.start
        if not 0 <= p < self.length:
            raise IndexError(f"position {position} is not in this rank's [{self.start}, {self.start + self.length})")
        batch, slot = divmod(p, self.batch_size)
        return batch % self.streams, (batch // self.streams) * self.batch_size + slot

    def pieces(self, stream: int) -> List[Tuple[int, int, int]]:
        """(shard id, skip, take) covering the stream's run of the concatenation, in order."""
        lo = self.stream_starts[stream]
        hi = lo + self.stream_lengths[stream]
        out = []
        first = int(np.searchsorted(self.offsets, lo, side='right')) - 1
        for k in range(max(first, 0), len(self.counts)):
            a, b = int(self.offsets[k]), int(self.offsets[k + 1])
            if a >= hi:
                break
            if b > lo:
                out.append((self.order[k], max(lo, a) - a, min(hi, b) - max(lo, a)))
        return out


class StreamReader:
    """Reads one stream forward and remembers its last ``READER_WINDOW`` samples; going further back re-opens.
    The images of local shards are read only when a sample is served (``ShardFiles``); what the shuffle buffer
    and the window hold of them is where they are."""

    def __init__(self, urls: Sequence[str], pieces: List[Tuple[int, int, int]], shuffle: int,
                 seed: Optional[int]) -> None:
        self.urls, self.pieces, self.shuffle, self.seed = urls, pieces, shuffle, seed
        self.length = sum(take for _, _, take in pieces)
        self.files = ShardFiles()
        self._restart()

    def _restart(self) -> None:
        raw = (s for shard, skip, take in self.pieces
               for s in shard_samples(self.urls[shard], skip, take, READ_EXTENSIONS, IMAGE_EXTENSIONS))
        if self.seed is not None and self.shuffle > 1:
            raw = shuffled(raw, self.shuffle, np.random.default_rng(self.seed))
        self._items = raw
        self._next = 0
        self._window: Dict[int, LazyRaw] = {}

    def get(self, place: int) -> Raw:
        if not 0 <= place < self.length:
            raise IndexError(f"place {place} is outside the stream (length {self.length})")
        if place not in self._window:
            if place < self._next:
                self._restart()
            while self._next <= place:
                self._window[self._next] = next(self._items)
                self._window.pop(self._next - READER_WINDOW, None)
                self._next += 1
        return self.files.resolve(self._window[place])


# ----------------------------------------------------------------------------- dataset and sampler

def decode_label(raw: Raw, num_classes: int) -> Tuple[bytes, int]:
    """(image bytes, label) of a sample; a missing part or a bad label raises (a damaged sample)."""
    key, parts = raw
    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
    if image is None:
        raise KeyError(f"sample {key} has no image ({'/'.join(IMAGE_EXTENSIONS)}); it has {sorted(parts)}")
    if LABEL_EXTENSION not in parts:
        raise KeyError(f"sample {key} has no .{LABEL_EXTENSION} label")
    label = int(parts[LABEL_EXTENSION].decode('utf-8').strip())
    if not 0 <= label < num_classes:
        raise ValueError(f"sample {key}: label {label} is not in [0, MODEL.NUM_CLASSES = {num_classes})")
    return image, label


class WdsDataset(Dataset):
    """One split of WebDataset shards as seen by rank ``rank`` of ``world`` (positions: see ``EpochLayout``)."""

    def __init__(self, root: str, split: str, train: bool, num_classes: int, rank: int, world: int,
                 batch_size: int, streams: int, seed: int, shuffle: int, transform: Optional[Callable] = None,
                 on_broken: str = 'substitute') -> None:
        if on_broken not in BROKEN_POLICIES:
            raise ValueError(f"on_broken must be one of {BROKEN_POLICIES}, got {on_broken!r}")
        require_source('webdataset', 'webdataset', 'wds')
        self.shards = read_index(root, split)
        check_local_shards(self.shards)
        self.urls = [s['url'] for s in self.shards]
        self.counts = [s['samples'] for s in self.shards]
        self.description = join_url(root, split)
        self.train, self.num_classes, self.rank, self.world = train, num_classes, rank, world
        self.batch_size, self.streams, self.seed, self.shuffle = batch_size, max(1, streams), seed, shuffle
        self.transform, self.on_broken = transform, on_broken
        self.broken_images = BrokenImageCounter()
        self._layouts: Dict[int, EpochLayout] = {}
        self._readers: Dict[Tuple[int, int], StreamReader] = {}

    def __len__(self) -> int:
        """All samples of the split (a rank reads ``layout(epoch).length`` of them)."""
        return sum(self.counts)

    def shard_order(self, epoch: int) -> List[int]:
        if not self.train:
            return list(range(len(self.counts)))
        g = torch.Generator().manual_seed(stream_seed(self.seed, epoch))
        return torch.randperm(len(self.counts), generator=g).tolist()

    def layout(self, epoch: int) -> EpochLayout:
        epoch = epoch if self.train else 0
        if epoch not in self._layouts:
            self._layouts = {epoch: EpochLayout(self.counts, self.shard_order(epoch), self.rank, self.world,
                                                self.batch_size, self.streams, self.train)}
        return self._layouts[epoch]

    def reader(self, epoch: int, stream: int) -> StreamReader:
        epoch = epoch if self.train else 0
        if (epoch, stream) not in self._readers:
            self._readers = {k: r for k, r in self._readers.items() if k[0] == epoch}  # an epoch's readers only
            seed = stream_seed(self.seed, epoch, self.rank, stream) if self.train else None
            self._readers[(epoch, stream)] = StreamReader(self.urls, self.layout(epoch).pieces(stream),
                                                          self.shuffle, seed)
        return self._readers[(epoch, stream)]

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state['_readers'] = {}  # open files and generators stay in their process
        return state

    def _broken(self, name: str, exc: BaseException) -> None:
        if self.on_broken == 'error':
            raise BrokenImageError(f"damaged sample {name}: {type(exc).__name__}: {exc} "
                                   f"(set DATA.STRICT_IMAGES False to skip such samples)") from exc
        self.broken_images.add()
        logger.warning("skipping damaged sample %s: %s: %s", name, type(exc).__name__, exc)

    def load(self, key: int) -> Optional[Tuple[Any, int, str]]:
        """(transformed image, label, sample key) at position ``key``; None for a dropped damaged sample."""
        epoch = getattr(key, 'epoch', 0)
        stream, place = self.layout(epoch).locate(int(key))
        reader = self.reader(epoch, stream)
        tries = 1 if self.on_broken != 'substitute' else min(reader.length, MAX_SUBSTITUTE_TRIES)
        encoded = getattr(self.transform, 'takes_encoded', False)
        seeded = isinstance(key, SampleKey) and self.transform is not None
        for attempt in range(tries):
            raw = reader.get((place + attempt) % reader.length)  # shard errors propagate: they are not damage
            name = f"{self.description}:{raw[0]}"
            with seeded_rngs(key) if seeded else contextlib.nullcontext():
                try:
                    data, label = decode_label(raw, self.num_classes)
                    img = self.transform.decode(data) if encoded else decode_image(data)
                except DECODE_ERRORS as exc:
                    self._broken(name, exc)
                    continue
                if self.transform is not None:
                    img = self.transform(img)
            return img, label, raw[0]
        if self.on_broken == 'drop':
            return None
        raise BrokenImageError(f"{tries} consecutive damaged samples from position {int(key)} of "
                               f"{self.description}; the shards look damaged")

    def __getitem__(self, key: int) -> Optional[Tuple[Any, int]]:
        loaded = self.load(key)
        return None if loaded is None else loaded[:2]

    def __repr__(self) -> str:
        return (f"WdsDataset({self.description!r}, {len(self)} samples in {len(self.urls)} shards, "
                f"{self.num_classes} classes)")


class WdsTrainSampler(Sampler[int]):
    """The positions of this rank's run of the epoch, in order, as ``SampleKey``s (the order itself comes from
    the shard order and shuffle buffers of ``WdsDataset``)."""

    def __init__(self, dataset: WdsDataset) -> None:
        self.dataset = dataset
        self.seed = dataset.seed
        self.epoch = 0

    def __iter__(self) -> Iterator[int]:
        layout = self.dataset.layout(self.epoch)
        return map(key_maker(self.epoch, self.seed), range(layout.start, layout.start + layout.length))

    def __len__(self) -> int:
        return self.dataset.layout(self.epoch).length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class WdsEvalSampler(Sampler[int]):
    """This rank's contiguous block of the validation split: every sample on exactly one rank, none padded."""

    def __init__(self, dataset: WdsDataset) -> None:
        layout = dataset.layout(0)
        self.indices = range(layout.start, layout.start + layout.length)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def set_epoch(self, epoch: int) -> None:
        """Validation order does not change between epochs."""
