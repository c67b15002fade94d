"""The core's hashing (csrc/util.c): XXH3 through the system libxxhash, through its x86 run-time
dispatcher where the library has one. The hashes are the xxhash package's (snapshot files and
object-store chunk ids are read by both), and a dispatched call leaves the vector registers'
upper halves clean (libxxhash 0.8.1's AVX-512 kernel does not: every legacy-SSE instruction
after it pays a false dependency, SSE2 XXH3 itself 3.5x slower)."""

import os
import subprocess

import pytest
import xxhash

import pylazymem as plm

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(os.path.dirname(HERE), "csrc")
# XXH3 has a code path per length range (0, 1-3, 4-8, 9-16, 17-128, 129-240, long: stripes,
# blocks of 1 KiB and a tail): every boundary and both sides of it
LENGTHS = sorted({0, 1, 2, 3, 4, 5, 8, 9, 15, 16, 17, 100, 128, 129, 200, 240, 241, 255, 256,
                  1023, 1024, 1025, 4095, 4096, 4097, 65536 + 7})


@pytest.mark.core
def test_core_xxh3_is_the_xxhash_package_s():
    from pylazymem._binding import ffi, lib

    data = os.urandom(max(LENGTHS) + 64)
    for n in LENGTHS:
        for off in (0, 1, 7):   # the kernels load unaligned
            b = data[off:off + n]
            assert lib.lm_xxh3(ffi.from_buffer(b), n) == xxhash.xxh3_64_intdigest(b), (n, off)
    assert plm.features().hashing in ("xxh3", "xxh3-dispatch")


@pytest.mark.core
@pytest.mark.source   # pylazymem._build reads csrc/lazymem.h: not in an installed package
def test_features_name_the_hash_the_build_uses():
    from pylazymem import _build

    want = "xxh3-dispatch" if _build.xxh_dispatch_available() else "xxh3"
    assert plm.features().hashing == want


HARNESS = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include "lm_internal.h"

/* XINUSE (XGETBV with ECX = 1): bit 2 = upper halves of the YMM registers, bit 6 = upper
   halves of ZMM0-15 in use: the state a legacy-SSE instruction pays for */
static unsigned dirty(void)
{
    uint32_t a, d;
    __asm__ volatile("xgetbv" : "=a"(a), "=d"(d) : "c"(1));
    (void)d;
    return a & ((1u << 2) | (1u << 6));
}

int main(int argc, char **argv)
{
    size_t n = (size_t)atol(argv[1]);
    unsigned char *b = malloc(n + 1);
    for (size_t i = 0; i < n; i++)
        b[i] = (unsigned char)(i * 2654435761u >> 13);
    /* the readout itself: a 256-bit register made non-zero dirties, vzeroupper cleans */
    __asm__ volatile("vpcmpeqd %%ymm1, %%ymm1, %%ymm1" ::: "xmm1");
    unsigned seen = dirty();
    __asm__ volatile("vzeroupper");
    unsigned cleaned = dirty();
    uint64_t h64 = lm_xxh3(b, n);
    unsigned after64 = dirty();
    uint64_t h128[2];
    lm_xxh3_128(b, n, h128);
    unsigned after128 = dirty();
    printf("%u %u %u %u %llu %llu %llu %s\n", seen, cleaned, after64, after128,
           (unsigned long long)h64, (unsigned long long)h128[0], (unsigned long long)h128[1],
           lm_xxh3_impl());
    return 0;
}
"""


def _cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.cc
@pytest.mark.source   # builds csrc/util.c
@pytest.mark.timeout(120)
def test_dispatched_hash_leaves_vector_state_clean(tmp_path):
    from pylazymem import _build

    if not _build.xxh_dispatch_available():
        pytest.skip("the system's libxxhash has no x86 dispatcher: the plain entry points are used")
    flags = _cpu_flags()
    if not {"avx2", "xgetbv1"} <= flags:
        pytest.skip("this CPU has no AVX2 or no XGETBV with ECX=1: nothing to clean, or no way to see it")
    src = tmp_path / "harness.c"
    src.write_text(HARNESS)
    exe = str(tmp_path / "harness")
    cc = subprocess.run(["gcc", "-std=gnu11", "-O2", "-DLM_XXH_DISPATCH", "-I", CSRC, str(src),
                         os.path.join(CSRC, "util.c"), "-o", exe, "-lxxhash", "-lpthread"],
                        capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    data = bytes((i * 2654435761 >> 13) & 0xFF for i in range(4096))
    for n in (4096, 1000, 100):   # the long-input kernel (vector), and shorter paths
        out = subprocess.run([exe, str(n)], capture_output=True, text=True, check=True).stdout.split()
        seen, cleaned, after64, after128 = map(int, out[:4])
        h64, lo, hi = map(int, out[4:7])
        assert seen and not cleaned, "XINUSE readout does not show the AVX upper state"
        assert after64 == 0, "lm_xxh3(%d) left the upper vector state dirty (XINUSE %#x)" % (n, after64)
        assert after128 == 0, "lm_xxh3_128(%d) left it dirty (XINUSE %#x)" % (n, after128)
        assert out[7] == "xxh3-dispatch"
        assert h64 == xxhash.xxh3_64_intdigest(data[:n])
        assert (hi << 64 | lo) == xxhash.xxh3_128_intdigest(data[:n])
