"""Where an extraction's rows land on the host: ``{hook: [prompt, layer, d_model]}``, copied there
while the device computes.

Two ways in, both without the host waiting for the device where they can:

- ``copy_rows`` (every engine): a chunk's rows, gathered on the device, into their rows of the
  result; ``finish_copies`` waits for them.
- ``Landing`` (packed runs on a GPU): each pack's rows straight into their slice, on a side
  stream, the last pack's while its last blocks still run.

From a GPU the result is page-locked memory: a device-to-pageable copy of the built-in study's
results (96 MB on a 7B model) took 73 ms on an H200, into page-locked memory 2 ms.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["MAX_PINNED_BYTES", "Landing", "copy_rows", "finish_copies", "to_host"]

log = logging.getLogger(__name__)

# Results up to this size are gathered in page-locked host memory, where a GPU's chunks land
# without the host waiting; larger ones in ordinary memory (pinning tens of GiB starves the OS).
MAX_PINNED_BYTES = 8 * 2**30


def copy_rows(
    flat: dict[str, Tensor], order: list[int], out: dict[str, Tensor], n_rows: int
) -> None:
    """Copies one chunk's rows (``order``, ascending) into ``flat[hook]`` on the host, made on
    the first chunk.

    A chunk of consecutive rows (every packed chunk of a fresh run) is one device-to-host copy
    straight into its slice of the result; from a GPU into page-locked memory it does not wait,
    so it overlaps the next chunk's forward and nothing is left to reassemble at the end (on
    the 1,500 long prompts of ``benchmarks/extract_gpu.py`` the reassembly took 69 ms with the
    GPU idle). Other chunks are scattered on the host. Call ``finish_copies`` before reading.
    """
    for hook, t in out.items():
        if hook not in flat and len(order) == n_rows and t.device.type == "cpu":
            flat[hook] = t  # one chunk of every row, already in order: nothing to copy
            continue
        if hook not in flat:
            shape = (n_rows, *t.shape[1:])
            nbytes = t.element_size() * math.prod(shape)
            pin = t.device.type == "cuda" and nbytes <= MAX_PINNED_BYTES
            flat[hook] = torch.empty(shape, dtype=t.dtype, pin_memory=pin)
        a, b = order[0], order[-1] + 1
        if b - a == len(order):
            flat[hook][a:b].copy_(t, non_blocking=True)
        else:
            flat[hook][torch.as_tensor(order)] = to_host(t)


def finish_copies(flat: dict[str, Tensor]) -> None:
    """Waits for the device-to-host copies of ``copy_rows``."""
    if torch.cuda.is_available() and any(t.is_pinned() for t in flat.values()):
        for device in range(torch.cuda.device_count()):
            torch.cuda.synchronize(device)


def to_host(t: Tensor) -> Tensor:
    """Returns ``t`` on the CPU; from a GPU through page-locked memory."""
    if t.device.type != "cuda":
        return t.to("cpu")
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t)
    return host


class Landing:
    """Where a packed run's rows land: ``{hook: [prompt, layer, d_model]}`` in page-locked host
    memory, copied there while the device computes.

    Each pack's rows (a consecutive range of prompts) are copied straight into their slice of
    the result on a side stream, so the copy overlaps the next pack's forward instead of
    holding up the device (the long prompts of ``benchmarks/extract_gpu.py``: 0.6 GB). The last
    pack has nothing after it to overlap with: its rows leave while its last two blocks run,
    every layer but those two already final (``early``), and the two follow the forward as one
    strided copy into their place (``land``). For the built-in study's one pack on an H200 that
    is 1.75 ms of copying after the forward (96 MB) cut to a 7 MB copy.

    On the CPU (where the tests run it) every copy is done when it returns.
    """

    # The last pack's layers that are copied after its forward.
    TAIL = 2

    def __init__(self, device: torch.device, n_rows: int) -> None:
        self.device = device
        self.n_rows = n_rows
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.flat: dict[str, Tensor] = {}
        self._early: set[str] = set()
        # (host view, its rows) to put in place once the device is done, and tensors the
        # device's copies read until then.
        self._patches: list[tuple[Tensor, Tensor]] = []
        self._in_flight: list[Tensor] = []

    def _host(self, hook: str, t: Tensor) -> Tensor:
        if hook not in self.flat:
            # A plain tensor, also when made in a hook during the forward (inference mode): the
            # result is the user's to modify.
            with torch.inference_mode(False):
                self.flat[hook] = torch.empty(
                    (self.n_rows, *t.shape[1:]), dtype=t.dtype, pin_memory=self.stream is not None
                )
        return self.flat[hook]

    def _copy_on_side(self, out: dict[str, Tensor], a: int, b: int) -> None:
        """Copies ``out`` into rows ``a:b`` on the side stream, after the work queued so far."""
        if self.stream is None:
            for hook, t in out.items():
                self._host(hook, t)[a:b].copy_(t)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for hook, t in out.items():
                self._host(hook, t)[a:b].copy_(t, non_blocking=True)
                t.record_stream(self.stream)  # not reused before the copy has read it

    def early(self, a: int, b: int) -> Callable[[int, dict[str, Tensor]], None]:
        """Returns the last pack's ``on_layer`` (``LastTokenRecorder.run``): its rows ``a:b``
        leave once all but ``TAIL`` layers are final."""

        def on_layer(position: int, buffers: dict[str, Tensor]) -> None:
            n = next(iter(buffers.values())).shape[1]
            if n > self.TAIL and position == n - self.TAIL - 1:
                self._copy_on_side(buffers, a, b)
                self._early.update(buffers)

        return on_layer

    def land(self, out: dict[str, Tensor], a: int, b: int, *, last: bool) -> None:
        """Copies one pack's rows (``a:b``) to the host without waiting."""
        if not last:
            self._copy_on_side(out, a, b)
            return
        for hook, t in out.items():
            host = self._host(hook, t)
            if hook not in self._early:
                host[a:b].copy_(t, non_blocking=True)
                continue
            # The layers the early copy took before they were computed.
            view, rows = host[a:b, -self.TAIL :], t[:, -self.TAIL :]
            if self.stream is not None:
                # After the early copy, which wrote these layers' rows before they were final.
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
                if copy_2d_async(view, rows):
                    self._in_flight.append(t)
                    continue
            dense = rows.contiguous()
            staged = torch.empty(dense.shape, dtype=dense.dtype, pin_memory=self.stream is not None)
            staged.copy_(dense, non_blocking=True)
            self._patches.append((view, staged))

    def finish(self) -> None:
        """Waits for every copy and puts what was staged in place."""
        if self.stream is not None:
            torch.cuda.synchronize(self.device)
        for view, staged in self._patches:
            view.copy_(staged)
        self._patches, self._in_flight = [], []


# cudaMemcpyKind
_DEVICE_TO_HOST = 2


def copy_2d_async(dst: Tensor, src: Tensor) -> bool:
    """Copies a CUDA tensor into page-locked host memory of the same shape, both strided in their
    first dimension only, as one ``cudaMemcpy2DAsync`` on the current stream; returns False
    (nothing copied) where the layouts or the CUDA runtime do not allow it.

    torch copies between such views through contiguous temporaries and a host-side scatter:
    for the built-in study's last two layers (7 MB into a 96 MB result) 0.9 ms on an H200
    host, against 0.14 ms for the one strided copy (``benchmarks/results/extract_gpu.json``).
    ``src`` must stay alive until the stream has run the copy.
    """
    memcpy_2d = _cuda_memcpy_2d()
    if memcpy_2d is None or dst.dtype != src.dtype or dst.shape != src.shape or dst.dim() < 2:
        return False
    width = src[0].numel() * src.element_size()  # the bytes of one row, contiguous in both
    if not (_rows_dense(src) and _rows_dense(dst) and dst.is_pinned()):
        return False
    stream = torch.cuda.current_stream(src.device).cuda_stream if src.is_cuda else None
    status = memcpy_2d(
        dst.data_ptr(), dst.stride(0) * dst.element_size(),
        src.data_ptr(), src.stride(0) * src.element_size(),
        width, src.shape[0], _DEVICE_TO_HOST, stream,
    )  # fmt: skip
    if status != 0:
        log.debug("cudaMemcpy2DAsync returned %d; copying through a staging buffer", status)
        return False
    return True


def _rows_dense(t: Tensor) -> bool:
    """Whether each ``t[i]`` is contiguous (the rows may be strided apart)."""
    return t[0].is_contiguous() and t.stride(0) >= t[0].numel()


@functools.cache
def _cuda_memcpy_2d() -> Callable[..., int] | None:
    """Returns ``cudaMemcpy2DAsync`` of the CUDA runtime this process loaded with torch (the one of
    torch's CUDA major version), or None (no CUDA, no ``/proc``, no such runtime)."""
    if not torch.cuda.is_available() or not torch.version.cuda:
        return None
    torch.cuda.init()
    runtime = f"libcudart.so.{torch.version.cuda.split('.')[0]}"
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = sorted({line.split()[-1] for line in maps if runtime in line})
        function = ctypes.CDLL(paths[0]).cudaMemcpy2DAsync
    except (OSError, IndexError, AttributeError):
        return None
    size = ctypes.c_size_t
    pointer = ctypes.c_void_p
    function.argtypes = [pointer, size, pointer, size, size, size, ctypes.c_int, pointer]
    function.restype = ctypes.c_int
    return function
