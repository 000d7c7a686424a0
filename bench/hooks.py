"""ns per alloc+free pair through each libomnicuda front end, against the fake driver.

Builds the fake libcuda.so.1 from tests/cstub/fake_libcuda.c and a small C timing loop, then
prints one row per front end with its overhead over calling the fake driver directly.
Run: python bench/hooks.py [--pairs N] [--repeats R]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from pathlib import Path

from omni_cstub import library_path

REPO = Path(__file__).resolve().parents[1]
FAKE_SOURCE = REPO / "tests" / "cstub" / "fake_libcuda.c"

LOOP_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>

typedef unsigned long long CUdeviceptr;
int cuMemAlloc_v2(CUdeviceptr *ptr, size_t size);
int cuMemFree_v2(CUdeviceptr ptr);

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv) {
    const char *front = argv[1];
    long pairs = atol(argv[2]);
    void *hooks = argc > 3 ? dlopen(argv[3], RTLD_NOW) : NULL;
    void *(*torch_alloc)(ssize_t, int, void *) = hooks ? dlsym(hooks, "omni_torch_alloc") : NULL;
    void (*torch_free)(void *, ssize_t, int, void *) =
        hooks ? dlsym(hooks, "omni_torch_free") : NULL;
    void *(*ort_alloc)(size_t) = hooks ? dlsym(hooks, "omni_ort_alloc") : NULL;
    void (*ort_free)(void *) = hooks ? dlsym(hooks, "omni_ort_free") : NULL;
    size_t size = 4096;
    CUdeviceptr p;
    double start = now();
    if (strcmp(front, "torch") == 0) {
        for (long i = 0; i < pairs; i++) torch_free(torch_alloc(size, 0, NULL), size, 0, NULL);
    } else if (strcmp(front, "ort") == 0) {
        for (long i = 0; i < pairs; i++) ort_free(ort_alloc(size));
    } else {
        for (long i = 0; i < pairs; i++) {
            if (cuMemAlloc_v2(&p, size) != 0) return 1;
            cuMemFree_v2(p);
        }
    }
    printf("%.1f\n", (now() - start) / pairs);
    return 0;
}
"""

FRONT_ENDS = [
    ("fake driver, direct", "direct", False),
    ("LD_PRELOAD cuMemAlloc_v2", "driver", True),
    ("torch omni_torch_alloc", "torch", False),
    ("ORT omni_ort_alloc", "ort", False),
]


def build(directory: Path) -> Path:
    subprocess.run(
        ["cc", "-O2", "-fPIC", "-shared", "-o", str(directory / "libcuda.so.1"), str(FAKE_SOURCE)],
        check=True,
    )
    source = directory / "loop.c"
    source.write_text(LOOP_SOURCE)
    program = directory / "loop"
    subprocess.run(
        ["cc", "-O2", "-o", str(program), str(source), f"-L{directory}", "-l:libcuda.so.1", "-ldl"],
        check=True,
    )
    return program


def measure(program: Path, front: str, preload: bool, pairs: int, repeats: int) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNI_")}
    env["LD_LIBRARY_PATH"] = str(program.parent)
    env["OMNI_GPU_MEMORY_LIMIT"] = "1GiB"
    command = [str(program), front, str(pairs)]
    if preload:
        env["LD_PRELOAD"] = str(library_path())
    elif front != "direct":
        command.append(str(library_path()))
    runs = [
        float(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout)
        for _ in range(repeats)
    ]
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        program = build(Path(tmp))
        results = [
            (label, measure(program, front, preload, args.pairs, args.repeats))
            for label, front, preload in FRONT_ENDS
        ]
    baseline = results[0][1]
    print(f"{'front end':<28} {'ns/pair':>9} {'overhead ns':>12}")
    for label, ns in results:
        print(f"{label:<28} {ns:>9.1f} {ns - baseline:>12.1f}")
    print(f"({args.pairs} alloc+free pairs of 4 KiB, best of {args.repeats}; target: <= 1000 ns)")


if __name__ == "__main__":
    main()
