/*
 * The LD_PRELOAD front end: driver entry points that programs (and the CUDA runtime, through
 * cuGetProcAddress and dlsym) reach instead of libcuda's. The library is linked with
 * -Bsymbolic-functions, so the addresses taken here are always these hooks.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <string.h>

#include "omni.h"

/* Managed memory has no pitch of its own; this is the alignment cuMemAllocPitch commonly uses. */
#define PITCH_ALIGNMENT 512

OMNI_API CUresult cuMemAlloc_v2(CUdeviceptr *dptr, size_t size) {
    const struct omni_driver *d = omni_driver();
    if (!d) return CUDA_ERROR_NOT_INITIALIZED;
    if (!dptr) return CUDA_ERROR_INVALID_VALUE;
    return omni_alloc(dptr, size, omni_current_device(d));
}

static CUresult alloc_pitch_device(const struct omni_driver *d, CUdeviceptr *dptr, size_t *pitch,
                                   size_t width, size_t height, unsigned int element_size) {
    CUresult rc = d->mem_alloc_pitch(dptr, pitch, width, height, element_size);
    if (rc != CUDA_SUCCESS) return rc;
    size_t size = *pitch * height;
    if (!omni_reserve(size)) {
        d->mem_free(*dptr);
        omni_record_failure();
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    omni_track(*dptr, size, omni_current_device(d), false);
    return CUDA_SUCCESS;
}

OMNI_API CUresult cuMemAllocPitch_v2(CUdeviceptr *dptr, size_t *pitch, size_t width,
                                     size_t height, unsigned int element_size) {
    const struct omni_driver *d = omni_driver();
    if (!d) return CUDA_ERROR_NOT_INITIALIZED;
    if (!dptr || !pitch || width == 0 || height == 0) return CUDA_ERROR_INVALID_VALUE;
    if (element_size != 4 && element_size != 8 && element_size != 16)
        return CUDA_ERROR_INVALID_VALUE;
    if (omni_mode == OMNI_MODE_DEVICE && d->mem_alloc_pitch)
        return alloc_pitch_device(d, dptr, pitch, width, height, element_size);
    size_t row = (width + PITCH_ALIGNMENT - 1) / PITCH_ALIGNMENT * PITCH_ALIGNMENT;
    if (row < width || height > SIZE_MAX / row) return CUDA_ERROR_INVALID_VALUE;
    CUresult rc = omni_alloc(dptr, row * height, omni_current_device(d));
    if (rc == CUDA_SUCCESS) *pitch = row;
    return rc;
}

OMNI_API CUresult cuMemFree_v2(CUdeviceptr dptr) { return omni_free(dptr); }

OMNI_API CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes) {
    if (!free_bytes || !total_bytes) return CUDA_ERROR_INVALID_VALUE;
    return omni_mem_info(free_bytes, total_bytes);
}

/* Stream-ordered, pool and VMM allocations would bypass the quota, so under one they are refused. */
static bool refused_under_quota(const char *name, int *logged) {
    uint64_t quota = __atomic_load_n(&omni_counters->quota, __ATOMIC_RELAXED);
    if (quota == 0) return false;
    if (!__atomic_exchange_n(logged, 1, __ATOMIC_RELAXED))
        omni_log("%s refused: stream-ordered, pool and VMM allocations would bypass this "
                 "process's %llu-byte GPU memory quota; use the default allocator instead "
                 "(for PyTorch, PYTORCH_CUDA_ALLOC_CONF=backend:native without "
                 "expandable_segments)", name, (unsigned long long)quota);
    omni_record_failure();
    return true;
}

#define REFUSED_OR_FORWARDED(name, field, ...)                                   \
    do {                                                                         \
        static int logged;                                                       \
        if (refused_under_quota(name, &logged)) return CUDA_ERROR_NOT_SUPPORTED; \
        const struct omni_driver *d = omni_driver();                             \
        if (!d) return CUDA_ERROR_NOT_INITIALIZED;                               \
        if (!d->field) return CUDA_ERROR_NOT_SUPPORTED;                          \
        return d->field(__VA_ARGS__);                                            \
    } while (0)

OMNI_API CUresult cuMemAllocAsync(CUdeviceptr *dptr, size_t size, CUstream stream) {
    REFUSED_OR_FORWARDED("cuMemAllocAsync", mem_alloc_async, dptr, size, stream);
}

OMNI_API CUresult cuMemAllocFromPoolAsync(CUdeviceptr *dptr, size_t size, CUmemoryPool pool,
                                          CUstream stream) {
    REFUSED_OR_FORWARDED("cuMemAllocFromPoolAsync", mem_alloc_from_pool_async, dptr, size, pool,
                         stream);
}

OMNI_API CUresult cuMemCreate(CUmemGenericAllocationHandle *handle, size_t size, const void *prop,
                              unsigned long long flags) {
    REFUSED_OR_FORWARDED("cuMemCreate", mem_create, handle, size, prop, flags);
}

OMNI_API CUresult cuMemPoolCreate(CUmemoryPool *pool, const void *props) {
    REFUSED_OR_FORWARDED("cuMemPoolCreate", mem_pool_create, pool, props);
}

OMNI_API CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, uint64_t flags);
OMNI_API CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, uint64_t flags,
                                      CUdriverProcAddressQueryResult *status);

struct hook {
    const char *base;     /* the name cuGetProcAddress is asked for */
    const char *exported; /* the name dlsym is asked for */
    int since;            /* the first CUDA version whose base name means this ABI */
    void *fn;
};

static const struct hook hooks[] = {
    {"cuMemAlloc", "cuMemAlloc_v2", 3020, (void *)cuMemAlloc_v2},
    {"cuMemAllocPitch", "cuMemAllocPitch_v2", 3020, (void *)cuMemAllocPitch_v2},
    {"cuMemFree", "cuMemFree_v2", 3020, (void *)cuMemFree_v2},
    {"cuMemGetInfo", "cuMemGetInfo_v2", 3020, (void *)cuMemGetInfo_v2},
    {"cuMemAllocAsync", "cuMemAllocAsync", 11020, (void *)cuMemAllocAsync},
    {"cuMemAllocFromPoolAsync", "cuMemAllocFromPoolAsync", 11020, (void *)cuMemAllocFromPoolAsync},
    {"cuMemCreate", "cuMemCreate", 10020, (void *)cuMemCreate},
    {"cuMemPoolCreate", "cuMemPoolCreate", 11020, (void *)cuMemPoolCreate},
    {"cuGetProcAddress", "cuGetProcAddress_v2", 12000, (void *)cuGetProcAddress_v2},
    {"cuGetProcAddress", "cuGetProcAddress", 11030, (void *)cuGetProcAddress},
};

#define HOOK_COUNT (sizeof hooks / sizeof hooks[0])

static void *hook_for_base_name(const char *symbol, int version) {
    for (size_t i = 0; i < HOOK_COUNT; i++)
        if (version >= hooks[i].since && strcmp(symbol, hooks[i].base) == 0) return hooks[i].fn;
    return NULL;
}

static void *hook_for_exported_name(const char *name) {
    for (size_t i = 0; i < HOOK_COUNT; i++)
        if (strcmp(name, hooks[i].exported) == 0) return hooks[i].fn;
    return NULL;
}

static void substitute_hook(const char *symbol, int version, void **pfn) {
    if (!symbol || !pfn || !*pfn) return;
    void *hook = hook_for_base_name(symbol, version);
    if (hook) *pfn = hook;
}

OMNI_API CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, uint64_t flags) {
    const struct omni_driver *d = omni_driver();
    if (!d) return CUDA_ERROR_NOT_INITIALIZED;
    if (!d->get_proc_address) return CUDA_ERROR_NOT_SUPPORTED;
    CUresult rc = d->get_proc_address(symbol, pfn, version, flags);
    if (rc == CUDA_SUCCESS) substitute_hook(symbol, version, pfn);
    return rc;
}

OMNI_API CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, uint64_t flags,
                                      CUdriverProcAddressQueryResult *status) {
    const struct omni_driver *d = omni_driver();
    if (!d) return CUDA_ERROR_NOT_INITIALIZED;
    if (!d->get_proc_address_v2) return CUDA_ERROR_NOT_SUPPORTED;
    CUresult rc = d->get_proc_address_v2(symbol, pfn, version, flags, status);
    if (rc == CUDA_SUCCESS) substitute_hook(symbol, version, pfn);
    return rc;
}

/*
 * dlsym, exported under both versions glibc defines it with, so programs linked against either
 * reach this one. A name is hooked only where the real lookup finds it (so only in libcuda's
 * scope). Known limit: dlsym(RTLD_NEXT, ...) forwarded from here searches after this library
 * rather than after the caller.
 */
static void *hooked_dlsym(void *handle, const char *name) {
    void *real = omni_real_dlsym(handle, name);
    if (!real || !name || strncmp(name, "cu", 2) != 0) return real;
    void *hook = hook_for_exported_name(name);
    return hook ? hook : real;
}

#if defined(__x86_64__)
__asm__(".symver omni_dlsym_base, dlsym@GLIBC_2.2.5");
#elif defined(__aarch64__)
__asm__(".symver omni_dlsym_base, dlsym@GLIBC_2.17");
#endif
__asm__(".symver omni_dlsym_2_34, dlsym@@GLIBC_2.34");

OMNI_API void *omni_dlsym_base(void *handle, const char *name) { return hooked_dlsym(handle, name); }
OMNI_API void *omni_dlsym_2_34(void *handle, const char *name) { return hooked_dlsym(handle, name); }
