"""How scoring runs on the machine: the matrix-product kernel, worker threads, the allocator, device copies.

Core code without Dagster, shared by `scoring.py` and `benchmarks/scoring.py` (whose roofline must
run exactly like the scorer: same kernel, same threads); `training.py` sets its threads here too.
"""

from __future__ import annotations

import ctypes
import functools
import platform
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
from torch import nn


def onednn_available(device: torch.device, dtype: torch.dtype = torch.float32) -> bool:
    """Whether `linear` can run on oneDNN for `dtype` on `device`.

    oneDNN multiplies bf16 only on CPUs with AVX512 (AVX512_BF16, AMX, or its AVX512 emulation): on
    an AVX2-only CPU (the 2-core AMD EPYC Zen 3 of session 7) `_linear_pointwise` in bf16 fails with
    "could not create a primitive descriptor", so bf16 there takes F.linear (emulated, slow).
    """
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.float32:
        return True
    name = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}.get(dtype)
    probe = getattr(torch.ops.mkldnn, name, None) if name else None  # private, so looked up, not assumed
    return bool(probe is not None and probe())


def has_amx() -> bool:
    """Whether this CPU has AMX tiles (oneDNN's bf16 matrix products run on them; measured 2-3x AVX512_BF16)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, so looked up, not assumed
    return bool(probe and probe())


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware: AVX512_BF16 or AMX on a CPU, bf16 on a GPU."""
    if device.type == "cuda":  # Ampere and later; is_bf16_supported() also counts emulation
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe is not None and probe() for probe in probes)  # private, so looked up, not assumed


def emulated_precision_warning(device: torch.device, dtype: torch.dtype) -> str | None:
    """What to tell whoever asked for `dtype` on a device that only emulates it, or None."""
    if dtype == torch.float32 or native_bf16(device):
        return None
    return (f"{str(dtype).removeprefix('torch.')} on this {device.type} is emulated (no AVX512_BF16, AMX or "
            "Ampere-class GPU): on a 2-core AVX2-only AMD EPYC bf16 scored 18x slower than fp32 (0.20M against "
            "3.77M pairs/s, benchmarks/scoring.py) and the default over arch trained 11x slower (47-50 ms against "
            "4.2 ms a 2,048-row step); fp32 is the faster choice here")


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, relu: bool, onednn: bool) -> torch.Tensor:
    """relu?(x @ w.T + b): x [M, K], w [N, K], b [N] -> [M, N], bias and ReLU fused on oneDNN.

    oneDNN's op is the one Inductor lowers Linear+ReLU to. On the project's 2-core AMD EPYC it runs
    fp32 at ~230 GFLOP/s per core where MKL's sgemm behind F.linear reaches 80-110 (MKL takes its
    AVX2 path on AMD), and bf16 at ~470 on the AVX512_BF16 dot products with fp32 accumulation.
    """
    if onednn:
        return torch.ops.mkldnn._linear_pointwise(x, w, b, "relu" if relu else "none", [], "")
    if relu and b is not None and x.is_cuda:
        # cuBLASLt's bias+ReLU epilogue (what Inductor emits for Linear+ReLU): one pass over the output.
        return torch._addmm_activation(b, x, w.T)
    y = nn.functional.linear(x, w, b)
    return torch.relu_(y) if relu else y


@functools.cache
def keep_freed_memory_mapped() -> bool:
    """Stop glibc from handing freed heap memory back to the kernel while scoring runs.

    Each tile allocates and frees ~6 MiB of intermediates (oneDNN ops have no `out=`). In worker
    threads glibc's per-thread heaps trim such frees back to the kernel and fault the pages in again on
    the next tile: 150k page faults and +25% CPU time for 8M fp32 pairs. Setting the thresholds
    (to the values glibc's own dynamic thresholds grow to, 32 MiB mmap / 128 MiB trim) stops that; it
    is process-wide and lasts, and costs at most 128 MiB of freed memory kept per heap.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 128 << 20))


@contextmanager
def intra_op_threads(n: int):
    """torch.set_num_threads(n) for the block when n > 0, restored after (training sets its count with this too)."""
    saved = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def single_threaded_kernels(enabled: bool = True):
    """One intra-op thread for the block. With worker threads each running its
    own kernels, the caller's small preparatory ops must not open 2-thread OpenMP regions either:
    on a machine whose other core is busy each region waits for it (measured: 0.17 s instead of
    5 ms to prepare 2k products, 14% of scoring 4k customers)."""
    return intra_op_threads(1 if enabled else 0)


def denormals_flushed() -> bool:
    """Whether this thread reads and writes denormal floats as zero (x86 DAZ reads 1e-39 as 0)."""
    return float(torch.tensor([1e-39], dtype=torch.float32) * 1.0) == 0.0


@contextmanager
def flush_denormals():
    """Denormal floats read and written as zero (x86 FTZ/DAZ) for the block, on this thread and the
    worker threads `run_units` starts; the previous setting after.

    Only when this thread runs its kernels on one thread (`torch.get_num_threads() == 1`, as under
    `single_threaded_kernels`): the mode is per thread and copied by threads a thread starts, so an
    OpenMP pool first started inside the block would keep it for the life of the process.

    A trained model's never-seen embedding rows (padding, null, out-of-vocabulary) decay under weight
    decay to ~1e-39, below float32's normal range, and every multiply that meets one takes a microcode
    assist. Products with a null brand or customers with a null region carry such values into the
    matrix products: fp32 scoring of the trained demo model with random tables ran at 0.72M pairs/s
    on one core instead of 3.2M. Zeroing them moves a logit by less than 1e-37.
    """
    if torch.get_num_threads() != 1:
        yield
        return
    was = denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(was)


def run_units(units: list[tuple[int, int]], work, workers: int) -> None:
    """Call work(start, stop) for every unit: inline when workers <= 1, else on `workers` threads
    that take the next unit when done with one (call it under `single_threaded_kernels`)."""
    if workers <= 1:
        with torch.inference_mode():
            for start, stop in units:
                work(start, stop)
        return
    lock, queue = threading.Lock(), list(reversed(units))
    flush = denormals_flushed()

    def worker() -> None:
        torch.set_num_threads(1)  # OpenMP's thread count is per OS thread
        torch.set_flush_denormal(flush)  # and so is the FPU's denormal mode (said, not left to inheritance)
        with torch.inference_mode():  # and so is grad mode
            while True:
                with lock:
                    if not queue:
                        return
                    start, stop = queue.pop()
                try:
                    work(start, stop)
                except BaseException:
                    with lock:  # the others stop after their current unit, not at the end of the stage
                        queue.clear()
                    raise

    with ThreadPoolExecutor(workers) as pool:
        for fut in [pool.submit(worker) for _ in range(workers)]:
            fut.result()


def default_workers(device: torch.device) -> int:
    """One worker per intra-op thread torch was given on CPU; one stream of work on a GPU."""
    return torch.get_num_threads() if device.type == "cpu" else 1


class HostCopies:
    """Each unit's results from a CUDA device into host arrays without making the CPU wait for them.

    A unit's tensors go into fresh pinned buffers with non-blocking copies and are moved into the
    (pageable) outputs one unit later, once an event says the copy is done: meanwhile the GPU runs the
    next unit. Only two units' worth of pinned memory is held at a time (a whole result pinned would be
    locked memory, rounded up to a power of two and kept by PyTorch's pinned-memory cache for the life
    of the process).
    """

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        self.outputs = outputs
        self.slots: list[tuple | None] = [None, None]
        self.turn = 0
        self.lock = threading.Lock()  # one stream of work per GPU by default, but workers may share it

    def put(self, start: int, stop: int, *tensors: torch.Tensor) -> None:
        with self.lock:
            self._drain(self.turn)
            staged = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)
                      for t in tensors]
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(tensors[0].device))  # behind the copies, on their device
            self.slots[self.turn] = (start, stop, staged, event)
            self.turn ^= 1

    def finish(self) -> None:
        with self.lock:
            for i in (self.turn, self.turn ^ 1):  # the older unit first
                self._drain(i)

    def _drain(self, i: int) -> None:
        if self.slots[i] is None:
            return
        start, stop, staged, event = self.slots[i]
        event.synchronize()
        for out, t in zip(self.outputs, staged):
            out[start:stop] = t
        self.slots[i] = None
