/*
 * A fake libcuda.so.1 backed by host memory, for testing libomnicuda without a GPU.
 *   FAKE_CUDA_VERSION  cuDriverGetVersion's answer (default 12040); 13000 and up switch
 *                      cuMemAdvise/cuMemPrefetchAsync to the CUmemLocation signatures.
 *   FAKE_CUDA_TOTAL    physical bytes cuMemGetInfo reports (default 8 GiB).
 *   FAKE_CUDA_FAIL     name of one entry point that fails, with FAKE_CUDA_FAIL_CODE (default 2).
 *   FAKE_CUDA_PREFETCH_GBPS  a prefetch takes count / this many GB/s (default: no time).
 * fake_cuda_counter(name) reads the counters below, so tests can see what the hooks called.
 */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
typedef struct {
    int type;
    int id;
} CUmemLocation;

#define HEADER 16
#define LOCATION_DEVICE 1
#define LOCATION_HOST 2

static struct {
    long long managed_allocs, device_allocs, pitch_allocs, async_allocs, frees, live_bytes;
    long long advise_device_calls, advise_location_calls, last_advise_device, bad_locations;
    long long prefetch_device_calls, prefetch_location_calls, prefetch_to_host, prefetch_to_gpu;
    long long last_managed_flags, get_proc_address_calls;
} counters;

long long fake_cuda_counter(const char *name) {
#define COUNTER(field) \
    if (strcmp(name, #field) == 0) return __atomic_load_n(&counters.field, __ATOMIC_SEQ_CST);
    COUNTER(managed_allocs) COUNTER(device_allocs) COUNTER(pitch_allocs) COUNTER(async_allocs)
    COUNTER(frees) COUNTER(live_bytes) COUNTER(advise_device_calls) COUNTER(advise_location_calls)
    COUNTER(last_advise_device) COUNTER(bad_locations) COUNTER(prefetch_device_calls)
    COUNTER(prefetch_location_calls) COUNTER(prefetch_to_host) COUNTER(prefetch_to_gpu)
    COUNTER(last_managed_flags) COUNTER(get_proc_address_calls)
#undef COUNTER
    return -1;
}

static void bump(long long *counter, long long by) { __atomic_fetch_add(counter, by, __ATOMIC_SEQ_CST); }

static int env_int(const char *name, int fallback) {
    const char *value = getenv(name);
    return value && *value ? atoi(value) : fallback;
}

static int version(void) { return env_int("FAKE_CUDA_VERSION", 12040); }

static CUresult injected(const char *entry) {
    const char *fail = getenv("FAKE_CUDA_FAIL");
    return fail && strcmp(fail, entry) == 0 ? env_int("FAKE_CUDA_FAIL_CODE", 2) : 0;
}

static CUresult host_alloc(CUdeviceptr *ptr, size_t size) {
    if (!ptr || size == 0) return 1;
    char *block = malloc(size + HEADER);
    if (!block) return 2;
    memcpy(block, &size, sizeof size);
    bump(&counters.live_bytes, (long long)size);
    *ptr = (CUdeviceptr)(uintptr_t)(block + HEADER);
    return 0;
}

CUresult cuInit(unsigned int flags) { return flags ? 1 : injected("cuInit"); }

CUresult cuDriverGetVersion(int *out) {
    *out = version();
    return injected("cuDriverGetVersion");
}

CUresult cuCtxGetDevice(int *device) {
    *device = 0;
    return 0;
}

CUresult cuMemAllocManaged(CUdeviceptr *ptr, size_t size, unsigned int flags) {
    if (injected("cuMemAllocManaged")) return injected("cuMemAllocManaged");
    if (flags != 1 && flags != 2) return 1;
    counters.last_managed_flags = flags;
    bump(&counters.managed_allocs, 1);
    return host_alloc(ptr, size);
}

CUresult cuMemAlloc_v2(CUdeviceptr *ptr, size_t size) {
    if (injected("cuMemAlloc_v2")) return injected("cuMemAlloc_v2");
    bump(&counters.device_allocs, 1);
    return host_alloc(ptr, size);
}

CUresult cuMemAllocPitch_v2(CUdeviceptr *ptr, size_t *pitch, size_t width, size_t height,
                            unsigned int element_size) {
    (void)element_size;
    if (injected("cuMemAllocPitch_v2")) return injected("cuMemAllocPitch_v2");
    *pitch = (width + 255) / 256 * 256;
    bump(&counters.pitch_allocs, 1);
    return host_alloc(ptr, *pitch * height);
}

CUresult cuMemAllocAsync(CUdeviceptr *ptr, size_t size, void *stream) {
    (void)stream;
    bump(&counters.async_allocs, 1);
    return host_alloc(ptr, size);
}

CUresult cuMemFree_v2(CUdeviceptr ptr) {
    if (!ptr) return 1;
    if (injected("cuMemFree_v2")) return injected("cuMemFree_v2");
    char *block = (char *)(uintptr_t)ptr - HEADER;
    size_t size;
    memcpy(&size, block, sizeof size);
    bump(&counters.live_bytes, -(long long)size);
    bump(&counters.frees, 1);
    free(block);
    return 0;
}

CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes) {
    if (injected("cuMemGetInfo_v2")) return injected("cuMemGetInfo_v2");
    const char *total_text = getenv("FAKE_CUDA_TOTAL");
    size_t total = total_text && *total_text ? strtoull(total_text, NULL, 10) : (8ull << 30);
    long long live = __atomic_load_n(&counters.live_bytes, __ATOMIC_SEQ_CST);
    *total_bytes = total;
    *free_bytes = (size_t)live > total ? 0 : total - (size_t)live;
    return 0;
}

static int valid_location(CUmemLocation where) {
    if (where.type == LOCATION_DEVICE || where.type == LOCATION_HOST) return 1;
    bump(&counters.bad_locations, 1);
    return 0;
}

CUresult cuMemAdvise(CUdeviceptr ptr, size_t count, int advice, int device) {
    (void)ptr, (void)count, (void)advice;
    bump(&counters.advise_device_calls, 1);
    counters.last_advise_device = device;
    return 0;
}

CUresult cuMemAdvise_v2(CUdeviceptr ptr, size_t count, int advice, CUmemLocation where) {
    (void)ptr, (void)count, (void)advice;
    if (!valid_location(where)) return 1;
    bump(&counters.advise_location_calls, 1);
    counters.last_advise_device = where.id;
    return 0;
}

/* Moving memory takes time: FAKE_CUDA_PREFETCH_GBPS (say 25 for PCIe) makes it count. */
static void transfer(size_t count) {
    const char *text = getenv("FAKE_CUDA_PREFETCH_GBPS");
    double gbps = text && *text ? atof(text) : 0.0;
    if (gbps <= 0) return;
    double seconds = (double)count / (gbps * 1e9);
    struct timespec pause = {(time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9)};
    nanosleep(&pause, NULL);
}

CUresult cuMemPrefetchAsync(CUdeviceptr ptr, size_t count, int device, void *stream) {
    (void)ptr, (void)stream;
    transfer(count);
    bump(&counters.prefetch_device_calls, 1);
    bump(device == -1 ? &counters.prefetch_to_host : &counters.prefetch_to_gpu, 1);
    return 0;
}

CUresult cuMemPrefetchAsync_v2(CUdeviceptr ptr, size_t count, CUmemLocation where,
                               unsigned int flags, void *stream) {
    (void)ptr, (void)stream;
    if (flags != 0 || !valid_location(where)) return 1;
    transfer(count);
    bump(&counters.prefetch_location_calls, 1);
    bump(where.type == LOCATION_HOST ? &counters.prefetch_to_host : &counters.prefetch_to_gpu, 1);
    return 0;
}

CUresult cuGetProcAddress(const char *symbol, void **pfn, int cuda_version, unsigned long long flags);
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cuda_version,
                             unsigned long long flags, int *status);

static void *lookup(const char *symbol, int v) {
    int location_api = v >= 13000;
    static const struct {
        const char *name;
        void *fn;
    } plain[] = {
        {"cuInit", (void *)cuInit},
        {"cuDriverGetVersion", (void *)cuDriverGetVersion},
        {"cuCtxGetDevice", (void *)cuCtxGetDevice},
        {"cuMemAllocManaged", (void *)cuMemAllocManaged},
        {"cuMemAlloc", (void *)cuMemAlloc_v2},
        {"cuMemAllocPitch", (void *)cuMemAllocPitch_v2},
        {"cuMemAllocAsync", (void *)cuMemAllocAsync},
        {"cuMemFree", (void *)cuMemFree_v2},
        {"cuMemGetInfo", (void *)cuMemGetInfo_v2},
    };
    for (size_t i = 0; i < sizeof plain / sizeof plain[0]; i++)
        if (strcmp(symbol, plain[i].name) == 0) return plain[i].fn;
    if (strcmp(symbol, "cuMemAdvise") == 0)
        return location_api ? (void *)cuMemAdvise_v2 : (void *)cuMemAdvise;
    if (strcmp(symbol, "cuMemPrefetchAsync") == 0)
        return location_api ? (void *)cuMemPrefetchAsync_v2 : (void *)cuMemPrefetchAsync;
    if (strcmp(symbol, "cuGetProcAddress") == 0)
        return v >= 12000 ? (void *)cuGetProcAddress_v2 : (void *)cuGetProcAddress;
    return NULL;
}

CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int cuda_version,
                             unsigned long long flags, int *status) {
    (void)flags;
    bump(&counters.get_proc_address_calls, 1);
    if (!symbol || !pfn) return 1;
    if (cuda_version > version()) return 1;
    *pfn = lookup(symbol, cuda_version);
    if (status) *status = *pfn ? 0 : 1;
    return 0;
}

CUresult cuGetProcAddress(const char *symbol, void **pfn, int cuda_version, unsigned long long flags) {
    return cuGetProcAddress_v2(symbol, pfn, cuda_version, flags, NULL);
}
