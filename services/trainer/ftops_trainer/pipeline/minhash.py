"""Vectorised MinHash for many short texts, compatible with datasketch.

Per-record ``datasketch.MinHash.update_batch`` and ``MinHashLSH.insert``/``query`` cost
about 100 us a record in Python overhead, too slow for 20k records/s on one core. Here
every record's shingles are hashed in one numpy pass and the permutations are applied
chunk by chunk. The signatures equal those of ``datasketch.MinHash(num_perm, seed)``
(scheme "affine32": MurmurHash3 fmix32 pre-mix, then ``a * h + b mod 2**32``) updated
with the same 32-bit shingle hashes and ``hashfunc=int``; the permutation parameters
are taken from datasketch itself.

Words are ``\\w+`` runs of the casefolded text. ASCII text (the common case) is split
with ``bytes.translate`` + ``split``, several times faster than a regex.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from datasketch import MinHash

U32 = npt.NDArray[np.uint32]
U64 = npt.NDArray[np.uint64]
I64 = npt.NDArray[np.int64]

# Odd 64-bit multiplier for the rolling n-gram hash (the golden-ratio constant).
_ROLL = np.uint64(0x9E3779B97F4A7C15)
# Shingles a chunk: the (num_perm x shingles) temporary stays around 4 MB, in cache.
_CHUNK_SHINGLES = 8192
# Every ASCII byte that is not a word character becomes a space.
_ASCII_NON_WORD = bytes(c for c in range(128) if not (chr(c).isalnum() or chr(c) == "_"))
_ASCII_WORDS = bytes.maketrans(_ASCII_NON_WORD, b" " * len(_ASCII_NON_WORD))
_NON_WORD = re.compile(r"\W+")
_SEPARATOR = b" \x01 "  # survives: _ASCII_WORDS turns every \x01 inside a text to a space
_SEPARATOR_CRC = zlib.crc32(b"\x01")


def _fmix32(h: U32) -> U32:
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _word_bytes(text: str) -> bytes:
    text = text.casefold()
    if not text.isascii():
        text = _NON_WORD.sub(" ", text)
    return text.encode().translate(_ASCII_WORDS)


def word_hashes(texts: Sequence[str]) -> tuple[U64, I64]:
    """CRC-32 of every word of every text, flat, and each text's word count."""
    words = (_SEPARATOR.join(map(_word_bytes, texts)) + _SEPARATOR).split()
    h = np.fromiter(map(zlib.crc32, words), dtype=np.uint64, count=len(words))
    # A word may share the separator's CRC; only the separator itself is one.
    maybe = np.flatnonzero(h == _SEPARATOR_CRC).tolist()
    ends = np.array([p for p in maybe if words[p] == b"\x01"], dtype=np.int64)
    is_word = np.ones(len(words), dtype=bool)
    is_word[ends] = False
    return h[is_word], np.diff(ends, prepend=-1) - 1


def shingles(texts: Sequence[str], ngram: int) -> tuple[U32, I64]:
    """32-bit hashes of every record's word n-grams (of its words when it has fewer than
    ``ngram``), flat, and the offsets of each record's slice (length len(texts) + 1)."""
    if not texts:
        return np.zeros(0, dtype=np.uint32), np.zeros(1, dtype=np.int64)
    h, lengths = word_hashes(texts)
    total = len(h)
    owner_len = np.repeat(lengths, lengths)
    position = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    short = owner_len < ngram
    grams = short | (position <= owner_len - ngram)
    out = h.copy()
    if total >= ngram:
        rolled = h[: total - ngram + 1].copy()
        for k in range(1, ngram):
            rolled = rolled * _ROLL + h[k : total - ngram + 1 + k]
        rolled ^= rolled >> np.uint64(32)
        at = np.flatnonzero(grams & ~short)
        out[at] = rolled[at]
    counts = np.bincount(np.repeat(np.arange(len(texts)), lengths)[grams], minlength=len(texts))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    return (out[grams] & np.uint64(0xFFFFFFFF)).astype(np.uint32), offsets


def permutations(num_perm: int, seed: int) -> tuple[U32, U32]:
    a, b = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations
    return np.asarray(a, dtype=np.uint32), np.asarray(b, dtype=np.uint32)


def signatures(values: U32, offsets: I64, num_perm: int, seed: int) -> U32:
    """One MinHash signature a record (an (n, num_perm) view); a record without
    shingles gets the all-ones row (datasketch's empty MinHash)."""
    a, b = permutations(num_perm, seed)
    a, b = a[:, None], b[:, None]
    n = len(offsets) - 1
    # Permutations x shingles: the reduction then runs along contiguous rows.
    out = np.full((num_perm, n), np.iinfo(np.uint32).max, dtype=np.uint32)
    mixed = _fmix32(values)
    first = 0
    while first < n:
        # Whole records a chunk, at least one even when it alone is over the budget.
        last = int(np.searchsorted(offsets, offsets[first] + _CHUNK_SHINGLES, side="right"))
        last = min(max(last - 1, first + 1), n)
        rows = np.arange(first, last)
        rows = rows[offsets[rows + 1] > offsets[rows]]
        if len(rows):
            lo = offsets[first]
            block = np.multiply(a, mixed[None, lo : offsets[last]])
            np.add(block, b, out=block)
            out[:, rows] = np.minimum.reduceat(block, offsets[rows] - lo, axis=1)
        first = last
    return out.T


def band_params(threshold: float, num_perm: int, recall: float) -> tuple[int, int]:
    """(bands, rows): the fewest bands (fewest false candidates) for which a pair at
    exactly ``threshold`` shares a band with probability >= ``recall``. datasketch's
    own optimum for 0.8 and 128 permutations, (9, 13), finds such a pair only 40% of
    the time; candidates are verified exactly here, so more bands cost little."""
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - threshold**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


def band_keys(sig: U32, bands: int, rows: int, seed: int) -> U64:
    """One 64-bit key a band (a random linear hash of its rows): records sharing a key
    are candidates. A rare key collision only adds a candidate, which is verified."""
    coef = np.random.default_rng(seed).integers(0, 1 << 63, size=(bands, rows), dtype=np.uint64)
    coef |= np.uint64(1)
    cube = sig[:, : bands * rows].astype(np.uint64).reshape(len(sig), bands, rows)
    keys: U64 = (cube * coef).sum(axis=2, dtype=np.uint64)
    return keys
