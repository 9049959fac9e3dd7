"""All Numba plumbing for perfsim's kernels lives here (numbagg-style).

Kernel modules decorate plain typed loops with `jit(...)`. Nothing is compiled, and Numba is not
even imported, until a kernel is first called: the prediction path imports kernel modules for their
byte/FLOP formulas and must answer in milliseconds (importing Numba alone costs ~0.4 s here).

Kernels write `for i in prange(n)`; `prange` below is the builtin `range` until compile time, when it
is swapped for `numba.prange` in the kernel module's globals, so the same source runs as the
NumPy-free Python reference of its own loop structure and as a parallel Numba kernel.
"""

from __future__ import annotations

import functools

prange = range

_NUMBA_OPTIONS = dict(nogil=True, cache=True, error_model="numpy")


class LazyKernel:
    """A function compiled by Numba on first call; calls after that go straight to the dispatcher."""

    def __init__(self, py_func, options):
        self.py_func = py_func
        self.options = options
        self._dispatcher = None
        functools.update_wrapper(self, py_func)

    def compile(self):
        if self._dispatcher is None:
            import numba

            module_globals = self.py_func.__globals__
            if module_globals.get("prange") is range:
                module_globals["prange"] = numba.prange
            # Numba types global callees at compile time: materialize lazy ones it will call.
            for name in self.py_func.__code__.co_names:
                callee = module_globals.get(name)
                if isinstance(callee, LazyKernel):
                    module_globals[name] = callee.compile()
            self._dispatcher = numba.njit(**self.options)(self.py_func)
        return self._dispatcher

    def __call__(self, *args):
        return (self._dispatcher or self.compile())(*args)


class LazyIntrinsic(LazyKernel):
    """A Numba @intrinsic made by `build()` when the first kernel calling it compiles, so importing a
    kernel module stays Numba-free. Called from Python it runs `py_func` (a plain-Python equivalent),
    when one is given."""

    def __init__(self, build, py_func=None):
        super().__init__(py_func or build, {})
        self._build = build

    def compile(self):
        if self._dispatcher is None:
            self._dispatcher = self._build()
        return self._dispatcher

    def __call__(self, *args):
        if self.py_func is self._build:
            raise TypeError(f"{self._build.__name__} is an intrinsic: call it from a jit kernel")
        return self.py_func(*args)


def _build_f16_to_f32():
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def f16_to_f32(typingctx, bits):
        """fp16 bits (uint16) -> float32, exact (NaN/inf too): LLVM's target-independent fpext."""

        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

        return types.float32(types.uint16), codegen

    return f16_to_f32


f16_to_f32 = LazyIntrinsic(_build_f16_to_f32)


def llvm_prefetch(builder, pointer, for_write: bool) -> None:
    """Emit LLVM's target-independent llvm.prefetch of the line at `pointer` (an i8*), kept in all cache
    levels (prefetcht0 on x86; prefetchw for a write where the CPU has it). A hint: it never faults, so
    it may point past an array's end. For intrinsics' codegen."""
    from llvmlite import ir

    i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
    prefetch = builder.module.globals.get("llvm.prefetch.p0") or ir.Function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), name="llvm.prefetch.p0"
    )
    builder.call(prefetch, [pointer, ir.Constant(i32, int(for_write)), ir.Constant(i32, 3), ir.Constant(i32, 1)])


def _build_prefetch_for_write():
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def prefetch_for_write(typingctx, array, element):
        """Ask for the cache line holding array's flat element `element`, to be written (LLVM's
        llvm.prefetch with rw=1: prefetchw on x86 where the CPU has it). A hint: never faults."""

        def codegen(context, builder, signature, args):
            data = context.make_array(signature.args[0])(context, builder, args[0]).data
            llvm_prefetch(builder, builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(8).as_pointer()), for_write=True)
            return context.get_dummy_value()

        return types.void(array, types.int64), codegen

    return prefetch_for_write


prefetch_for_write = LazyIntrinsic(_build_prefetch_for_write)


def jit(parallel: bool = False, fastmath: bool = True):
    """Decorator: a lazily compiled Numba kernel (cache=True, so a second process does not recompile)."""

    def wrap(py_func):
        return LazyKernel(py_func, dict(_NUMBA_OPTIONS, parallel=parallel, fastmath=fastmath))

    return wrap


_THREADS = []  # what set_threads last set: numba.get_num_threads() costs ~2 us from Python, and a GEMV call asks


def set_threads(n_threads: int) -> None:
    """Numba's thread count for the parallel kernels; set it here, not with numba.set_num_threads."""
    import numba

    numba.set_num_threads(n_threads)
    _THREADS[:] = [n_threads]


def threads_in_use() -> int:
    if not _THREADS:
        import numba

        _THREADS.append(numba.get_num_threads())
    return _THREADS[0]


def max_threads() -> int:
    import numba

    return numba.config.NUMBA_NUM_THREADS


_HUGE_PAGE_BYTES = 2 << 20


def zeros_huge_pages(shape, dtype):
    """np.zeros on memory advised for transparent huge pages (2 MiB instead of 4 KiB) where the OS
    allows it. Decode walks the KV cache and the weights in strides that touch a new 4 KiB page every
    few hundred bytes; with huge pages those page walks disappear (kv_append measured 41 -> ~10 us a
    layer on this host class). Falls back to plain np.zeros where madvise or THP is unavailable."""
    import mmap

    import numpy as np

    dtype = np.dtype(dtype)
    n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if n_bytes < (4 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return np.zeros(shape, dtype)
    # The kernel backs only the 2 MiB-aligned stretches of a mapping with huge pages, and mmap aligns to
    # 4 KiB: a 5.3 MB matrix kept up to half its bytes on 4 KiB pages, and each separate matrix read
    # from DRAM cost ~30 us more than the same bytes inside one large buffer (page walks, nested under
    # this VM's). So map 2 MiB more and start the array at the first 2 MiB boundary.
    buffer = mmap.mmap(-1, n_bytes + _HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buffer.madvise(mmap.MADV_HUGEPAGE)
    except OSError:
        pass
    raw = np.frombuffer(buffer, dtype=np.uint8)
    offset = -raw.ctypes.data % _HUGE_PAGE_BYTES
    return raw[offset : offset + n_bytes].view(dtype).reshape(shape)
