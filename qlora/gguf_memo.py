"""One parse of a GGUF file per model load.

gguf's GGUFReader parses every metadata array element by element: SmolLM2's 49k-token vocabulary
and merges take ~6.5 s on a 2-core AVX2 EPYC. transformers builds a reader for the config, one for the
tokenizer, and two more for the weights, and the memory estimate reads one more: ~30 s of a 57 s load
of a 135M model. transformers also rebuilds gguf's tensor-name map once per module (397 times,
~8 s). Inside `shared()` each file is parsed once and each name map built once; both are dropped on
exit, so the parsed metadata (~160 MB) does not outlive the load.

`gguf.GGUFReader` and `gguf.get_tensor_name_map` are swapped for memoised versions while the block
runs: transformers (the pinned 5.25 range) imports both from the `gguf` module at call time.
A reader is used read-only by all of them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

_lock = threading.Lock()
_depth = 0
_saved: tuple | None = None


@contextlib.contextmanager
def shared():
    """Reuse one GGUFReader per (file, size, mtime) and one tensor-name map per arguments inside
    the block (nesting is fine; the outermost block restores gguf's own functions)."""
    global _depth, _saved
    import gguf

    with _lock:
        if _depth == 0:
            _saved = (gguf.GGUFReader, gguf.get_tensor_name_map)
            gguf.GGUFReader, gguf.get_tensor_name_map = _memo_reader(_saved[0]), functools.lru_cache(8)(_saved[1])
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gguf.GGUFReader, gguf.get_tensor_name_map = _saved
                _saved = None


def _memo_reader(reader_cls):
    @functools.lru_cache(maxsize=2)
    def cached(path: str, mtime_ns: int, size: int):
        return reader_cls(path)

    def reader(path, mode: str = "r"):
        if mode != "r":  # writable memmaps are never shared
            return reader_cls(path, mode)
        st = os.stat(path)
        return cached(os.path.abspath(path), st.st_mtime_ns, st.st_size)

    return reader
