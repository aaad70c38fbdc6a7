"""Page tables for optimizer state: every parameter's state is one page (state.StateLayout).

`ResidentPages` keeps all pages in memory on the parameters' device: no copies, no thread. It is
what `adamw`/`adamw_8bit` use, and what the paged optimizers use while their state fits the budget.

`PagedPages` keeps at most `budget` bytes of pages resident and evicts the least recently used
page to a backing store (store.py) when a page must come in. One worker thread owns the page table
and does every copy, in submission order; the optimizer asks it to prefetch the next parameter's
page while it updates the current one, so paging overlaps with compute. Counters: bytes paged in
and out, evictions, prefetch hits and the seconds the optimizer waited for a page (stall).

Evicted buffers are kept for reuse by a page of the same size (LoRA has few distinct shapes):
fresh memory costs a page fault per 4 KiB. Kept buffers count towards the budget.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import QloraError
from .store import PAGE_ALIGN


class ResidentPages:
    """All pages resident on `device`, zero-initialised."""

    persistent = True  # acquire(i) always returns the same buffer

    def __init__(self, sizes: list[int], device: torch.device):
        self._pages = [torch.zeros(n, dtype=torch.uint8, device=device) for n in sizes]

    def acquire(self, i: int) -> torch.Tensor:
        return self._pages[i]

    def prefetch(self, i: int) -> None:
        pass

    def release(self, i: int) -> None:
        pass

    def read(self, i: int) -> torch.Tensor:
        return self._pages[i].to("cpu", copy=True)

    def write(self, i: int, data: torch.Tensor) -> None:
        self._pages[i].copy_(data)

    def stats(self) -> dict:
        total = sum(p.numel() for p in self._pages)
        return {"paged": False, "resident_bytes": total, "bytes_in": 0, "bytes_out": 0, "evictions": 0,
                "page_ins": 0, "prefetch_hits": 0, "peak_resident_bytes": total, "stall_s": 0.0,
                "budget_bytes": None, "backing": None}

    def close(self) -> None:
        self._pages = []


class PagedPages:
    """At most `budget` bytes of pages resident; the rest in `store` (FileStore or PinnedStore)."""

    persistent = False

    def __init__(self, sizes: list[int], budget: int, store, device: torch.device):
        self._sizes = sizes
        self._offsets = page_offsets(sizes)
        self._budget = budget
        self._store = store
        self._cuda = device.type == "cuda"
        self._resident: OrderedDict[int, torch.Tensor] = OrderedDict()  # least recently used first
        self._dirty: set[int] = set()
        self._prefetched: set[int] = set()
        self._fences: dict[int, object] = {}  # CUDA: event after the last update of a page
        self._pinned: int | None = None  # the page being updated; never evicted
        self._spare: dict[int, list[torch.Tensor]] = {}  # evicted buffers by size, for reuse
        self._used = 0  # resident + spare bytes
        self._counters = {"bytes_in": 0, "bytes_out": 0, "evictions": 0, "page_ins": 0,
                          "prefetch_hits": 0, "peak_resident_bytes": 0}
        self._stall_s = 0.0
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qlora-pager")

    # ---- called by the optimizer (main thread) ----

    def prefetch(self, i: int) -> None:
        self._worker.submit(self._load, i, False)  # best effort: a failure resurfaces in acquire

    def acquire(self, i: int) -> torch.Tensor:
        t0 = time.perf_counter()
        page = self._call(self._load, i, True)
        self._stall_s += time.perf_counter() - t0
        return page

    def release(self, i: int) -> None:
        fence = None
        if self._cuda:  # the worker must not copy or free the page before the update has run
            fence = torch.cuda.Event()
            fence.record()
        self._worker.submit(self._unpin, i, fence)

    def read(self, i: int) -> torch.Tensor:
        return self._call(self._read, i)

    def write(self, i: int, data: torch.Tensor) -> None:
        self._call(self._write, i, data)

    def stats(self) -> dict:
        resident = sum(p.numel() for p in self._resident.values())
        return {"paged": True, "resident_bytes": resident, **self._counters, "stall_s": self._stall_s,
                "budget_bytes": self._budget, "backing": self._store.describe()}

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        self._resident.clear()
        self._spare.clear()
        self._store.close()

    def _call(self, fn, *args):
        try:
            return self._worker.submit(fn, *args).result()
        except OSError as e:
            raise QloraError(
                f"paged optimizer: moving state to/from {self._store.describe()} failed ({e}); "
                "the run stops here - resume from the last checkpoint after fixing the disk"
            ) from None

    # ---- worker thread only ----

    def _load(self, i: int, pin: bool) -> torch.Tensor | None:
        page = self._resident.get(i)
        if page is not None:
            self._resident.move_to_end(i)
            if pin and i in self._prefetched:
                self._counters["prefetch_hits"] += 1
        else:
            page = self._buffer(self._sizes[i])
            if page is None:
                if pin:  # build_optimizer checks budget >= the largest page, so this is a bug
                    raise RuntimeError(f"page {i} ({self._sizes[i]} bytes) does not fit budget {self._budget}")
                return None
            try:
                self._store.load_into(self._offsets[i], page)
            except BaseException:
                self._spare.setdefault(page.numel(), []).append(page)
                raise
            self._resident[i] = page
            c = self._counters
            c["bytes_in"] += page.numel()
            c["page_ins"] += 1
            c["peak_resident_bytes"] = max(c["peak_resident_bytes"], self._used)
            if not pin:
                self._prefetched.add(i)
        if pin:
            self._pinned = i
            self._prefetched.discard(i)
        return page

    def _buffer(self, size: int) -> torch.Tensor | None:
        """A buffer of `size` bytes within the budget: a spare one, fresh memory, or the buffer of
        an evicted page. None when only the pinned page could make room."""
        while True:
            if self._spare.get(size):
                return self._spare[size].pop()
            if self._used + size <= self._budget:
                self._used += size
                return self._store.alloc(size)
            other = next((n for n, bufs in self._spare.items() if bufs), None)
            if other is not None:  # free a spare of another size
                self._spare[other].pop()
                self._used -= other
                continue
            victim = next((j for j in self._resident if j != self._pinned), None)
            if victim is None:
                return None
            self._evict(victim)

    def _unpin(self, i: int, fence) -> None:
        self._dirty.add(i)
        if fence is not None:
            self._fences[i] = fence
        if self._pinned == i:
            self._pinned = None

    def _settle(self, j: int) -> None:
        fence = self._fences.pop(j, None)
        if fence is not None:
            fence.synchronize()

    def _evict(self, j: int) -> None:
        page = self._resident[j]
        if j in self._dirty:  # write first: if it fails the page stays resident and dirty
            self._settle(j)
            self._store.save(self._offsets[j], page)
            self._dirty.discard(j)
            self._counters["bytes_out"] += page.numel()
        del self._resident[j]
        self._prefetched.discard(j)
        self._spare.setdefault(page.numel(), []).append(page)  # still counted in _used
        self._counters["evictions"] += 1

    def _read(self, i: int) -> torch.Tensor:
        page = self._resident.get(i)
        if page is None:
            return self._store.read_cpu(self._offsets[i], self._sizes[i])
        self._settle(i)
        return page.to("cpu", copy=True)

    def _write(self, i: int, data: torch.Tensor) -> None:
        page = self._resident.get(i)
        if page is None:
            self._store.write_cpu(self._offsets[i], data)
        else:
            self._settle(i)
            page.copy_(data)
            self._dirty.add(i)


def page_offsets(sizes: list[int]) -> list[int]:
    """Offsets of the pages in the backing store, each on an OS page boundary."""
    offsets, at = [], 0
    for n in sizes:
        offsets.append(at)
        at += -(-n // PAGE_ALIGN) * PAGE_ALIGN
    return offsets


def store_bytes(sizes: list[int]) -> int:
    return sum(-(-n // PAGE_ALIGN) * PAGE_ALIGN for n in sizes)
