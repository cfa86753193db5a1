"""Peak memory of one call, and the memory budget of a point's process (CPU RSS or CUDA allocator).

Peak memory (``peak_bytes`` and ``mem_method`` in every row) is what one call allocates on top of
its inputs. CUDA (``cuda-max-allocated``): ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()`` minus ``memory_allocated()`` before the call. CPU (``cpu-rss-hwm``):
the resident-set high-water mark of the point's process over its baseline. Before the memory
call glibc is told to mmap every block >= 256 KiB and to hand freed heap pages back
(``mallopt`` + ``malloc_trim``; otherwise RSS carries garbage of earlier calls), the baseline is
``VmRSS``, and ``VmHWM`` is reset by writing ``5`` to ``/proc/self/clear_refs`` (checked on this
machine: ``VmHWM`` and ``ru_maxrss`` both drop to the current RSS). Then peak = ``VmHWM`` -
baseline - growth of ``RssFile`` (library code paged in is not the op's). Where ``clear_refs``
is not writable the method is ``cpu-ru-maxrss``: lifetime ``ru_maxrss``, an upper bound. The
peak covers everything the pass creates: output, autograd buffers, input gradients (for
``model12`` the parameter gradients too). RSS also counts memory outside PyTorch's allocator
(BLAS and OpenMP workspaces, heap fragmentation) that allocator statistics miss: fwd+bwd at
L=2048, H=12 reads 213 MB for top-k, 307 MB for chunked and 891 MB for vanilla where PyTorch's
allocator trace peaks at 172, 280 and 885 MB. For Performer (thousands of small blocks per call)
RSS reads 1.3-2.7x its allocator peak and varies from run to run.

Check against an analytic count (AMD EPYC, 2 cores, torch 2.13.0, float32):
``vanilla_attention`` forward at L=4096, H=12 holds the masked scores, the softmax output and the
copy that zeroes fully masked rows at once (3 x L*L*H*4 B = 3 x 805.3 MB) plus K and V copied by
``repeat_interleave`` (2 x 12.6 MB): 2441.1 MB. ``cpu-rss-hwm`` reads 2441.2 MB (PyTorch's own
allocator trace, ``torch.profiler(profile_memory=True)``, also peaks at 2441.1 MB). At L=2048:
616.6 MB analytic, 620.8 MB read. A 200 MB ``torch.ones`` inside the op reads 199.9 MB.
``tests/test_bench.py`` checks the 200 MB case and vanilla at L=1024 within 10 %.

Memory budget. CPU: the meter sets ``resource.setrlimit(RLIMIT_AS)`` to the process's address-space
size once inputs are built, plus the budget, so an allocation past the budget fails inside PyTorch
(``RuntimeError: ... can't allocate memory``) instead of reaching the machine's OOM killer. Address
space also counts reserved, untouched pages (thread stacks, malloc arenas: tens of MB), so the
limit is slightly conservative. CUDA: ``torch.cuda.set_per_process_memory_fraction`` with the
budget over what is already allocated.
"""

from __future__ import annotations

import re
import resource

import torch

__all__ = ["parse_bytes", "CpuMeter", "CudaMeter", "meter_for"]


def parse_bytes(text) -> int:
    """Bytes from ``16GiB``, ``500MB``, ``2G`` or a plain number.

    ``KiB/MiB/GiB`` and bare ``K/M/G`` are powers of 1024 (as ``ulimit``); ``kB/MB/GB`` powers of 1000.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([kmgt])(i?)(b?))?\s*(?:b|bytes)?\s*", str(text), flags=re.I)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 16GiB, 500MB or 1073741824")
    value, prefix, binary, b = float(m.group(1)), (m.group(2) or "").lower(), m.group(3), m.group(4)
    if not prefix:
        return int(value)
    base = 1000 if (b and not binary) else 1024
    return int(value * base ** (" kmgt".index(prefix)))


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _malloc_for_rss():
    """Make glibc's RSS follow live memory: return freed heap pages, mmap every block >= 256 KiB.

    By default glibc raises its mmap threshold up to 32 MiB as blocks are freed, and serves later
    blocks from a heap it does not shrink, so RSS would carry earlier calls' garbage. Called only
    before the (untimed) memory call: the timed calls run with the default allocator.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD (fixed from now on)
        libc.mallopt(-1, 256 * 1024)  # M_TRIM_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: RSS may include freed heap memory; peaks then read high, never low


class CpuMeter:
    """Peak RSS of this process over a baseline; enforces the budget with RLIMIT_AS."""

    def __init__(self, budget_bytes):
        vmsize_kb = _proc_status_kb("VmSize")
        if budget_bytes and vmsize_kb is not None:
            # Address space already mapped plus the budget: allocations past it fail in PyTorch.
            limit = vmsize_kb * 1024 + int(budget_bytes)
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard != resource.RLIM_INFINITY:
                limit = min(limit, hard)
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        self.method = "cpu-rss-hwm"

    def start(self):
        _malloc_for_rss()
        self.baseline = _proc_status_kb("VmRSS")
        self.file_base = _proc_status_kb("RssFile") or 0
        if self.baseline is None:  # no /proc: fall back to psutil and the lifetime maximum
            import psutil

            self.baseline, self.method = psutil.Process().memory_info().rss // 1024, "cpu-ru-maxrss"
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM (and ru_maxrss) to the current RSS
        except OSError:
            self.method = "cpu-ru-maxrss"  # lifetime maximum: an upper bound

    def peak(self):
        hwm = _proc_status_kb("VmHWM") if self.method == "cpu-rss-hwm" else None
        if hwm is None:
            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
        # Library code paged in during the call is not the op's memory.
        file_growth = max(0, (_proc_status_kb("RssFile") or 0) - self.file_base)
        return max(0, (hwm - self.baseline - file_growth) * 1024)

    def sync(self):
        pass


class CudaMeter:
    """``torch.cuda.max_memory_allocated`` over the allocation before the op."""

    method = "cuda-max-allocated"

    def __init__(self, budget_bytes, device):
        self.device = device
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        total = torch.cuda.get_device_properties(device).total_memory
        if budget_bytes:
            torch.cuda.set_per_process_memory_fraction(min(1.0, (base + budget_bytes) / total), device)

    def start(self):
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        self.baseline = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self):
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - self.baseline)

    def sync(self):
        torch.cuda.synchronize(self.device)


def meter_for(device: torch.device, budget_bytes: int):
    """The meter of ``device``; creating it switches the budget on (``0``: no budget)."""
    return CudaMeter(budget_bytes, device) if device.type == "cuda" else CpuMeter(budget_bytes)
