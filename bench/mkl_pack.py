#!/usr/bin/env python3
"""One decode-step product, x·Wᵀ with few rows, through libtorch's path (MKL re-packs W on every
call) and through MKL's packed GEMM (W packed once), as src/models/mkl.rs calls it.

    .venv/bin/python bench/mkl_pack.py [--threads 2]
"""
import argparse
import ctypes
import time

import torch

ROW_MAJOR, NO_TRANS, TRANS, PACKED, B_MATRIX = 101, 111, 112, 151, 162


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lib = ctypes.CDLL(torch.__file__.replace("__init__.py", "lib/libtorch_cpu.so"))
    i, f, p = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
    lib.cblas_sgemm_pack_get_size.restype = ctypes.c_size_t
    lib.cblas_sgemm_pack_get_size.argtypes = [i] * 4
    lib.cblas_sgemm_pack.argtypes = [i, i, i, i, i, i, f, p, i, p]
    lib.cblas_sgemm_compute.argtypes = [i, i, i, i, i, i, p, i, p, i, f, p, i]

    def pack(w, m=16):
        n, k = w.shape
        buf = torch.empty(lib.cblas_sgemm_pack_get_size(B_MATRIX, m, n, k) // 4 + 1)
        lib.cblas_sgemm_pack(ROW_MAJOR, B_MATRIX, TRANS, m, n, k, 1.0, w.data_ptr(), k, buf.data_ptr())
        return buf

    def timed(fn, reps=300):
        for _ in range(10):
            fn()
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps * 1e3

    print(f"{args.threads} threads; 16 distinct weights in turn, so none stays in cache")
    for n, k in ((3072, 768), (768, 3072), (768, 768)):
        weights = [torch.randn(n, k) for _ in range(16)]
        packed = [pack(w) for w in weights]
        for m in (10, 16, 40, 80):
            x, out, turn = torch.randn(16 if m < 16 else m, k), torch.empty(max(m, 16), n), [0]

            def plain():
                turn[0] = (turn[0] + 1) % 16
                return torch.mm(x[:m], weights[turn[0]].t())

            def mkl():
                turn[0] = (turn[0] + 1) % 16
                rows = x.shape[0]
                lib.cblas_sgemm_compute(ROW_MAJOR, NO_TRANS, PACKED, rows, n, k, x.data_ptr(), k,
                                        packed[turn[0]].data_ptr(), n, 0.0, out.data_ptr(), n)

            a, b = min(timed(plain), timed(plain)), min(timed(mkl), timed(mkl))
            print(f"{k}->{n}, {m} rows: libtorch {a:.3f} ms, MKL packed {b:.3f} ms ({a / b:.2f}x)")


if __name__ == "__main__":
    main()
