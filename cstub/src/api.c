/* The API Python and the in-process front ends (PyTorch, ONNX Runtime) call. */
#define _GNU_SOURCE
#include <sys/types.h>

#include "omni.h"
#include "omnicuda.h"

/* PyTorch CUDAPluggableAllocator: torch turns a NULL return into its out-of-memory error. */
OMNI_API void *omni_torch_alloc(ssize_t size, int device, void *stream) {
    (void)stream;
    CUdeviceptr ptr = 0;
    if (size < 0 || omni_alloc(&ptr, (size_t)size, device) != CUDA_SUCCESS) return NULL;
    return (void *)(uintptr_t)ptr;
}

OMNI_API void omni_torch_free(void *ptr, ssize_t size, int device, void *stream) {
    (void)size, (void)device, (void)stream;
    if (ptr) (void)omni_free((CUdeviceptr)(uintptr_t)ptr);
}

/* ONNX Runtime gpu_external_alloc/free/empty_cache; the device is the current context's. */
OMNI_API void *omni_ort_alloc(size_t size) {
    const struct omni_driver *d = omni_driver();
    CUdeviceptr ptr = 0;
    if (!d || omni_alloc(&ptr, size, omni_current_device(d)) != CUDA_SUCCESS) return NULL;
    return (void *)(uintptr_t)ptr;
}

OMNI_API void omni_ort_free(void *ptr) {
    if (ptr) (void)omni_free((CUdeviceptr)(uintptr_t)ptr);
}

/* Nothing to release: the hooks keep no cache of their own. */
OMNI_API void omni_ort_empty_cache(void) {}

OMNI_API int omni_set_quota(uint64_t bytes) {
    __atomic_store_n(&omni_counters->quota, bytes, __ATOMIC_RELAXED);
    return CUDA_SUCCESS;
}

OMNI_API void omni_get_usage(struct omni_usage *out) {
    struct omni_region *c = omni_counters;
    out->pid = __atomic_load_n(&c->pid, __ATOMIC_RELAXED);
    out->quota = __atomic_load_n(&c->quota, __ATOMIC_RELAXED);
    out->used = __atomic_load_n(&c->used, __ATOMIC_RELAXED);
    out->peak = __atomic_load_n(&c->peak, __ATOMIC_RELAXED);
    out->count = __atomic_load_n(&c->count, __ATOMIC_RELAXED);
    out->failures = __atomic_load_n(&c->failures, __ATOMIC_RELAXED);
}

OMNI_API int omni_mode_is_managed(void) { return omni_mode == OMNI_MODE_MANAGED; }

OMNI_API int omni_mem_get_info(size_t *free_bytes, size_t *total_bytes) {
    return omni_mem_info(free_bytes, total_bytes);
}

OMNI_API int omni_driver_version(void) {
    const struct omni_driver *d = omni_driver();
    return d ? d->version : 0;
}

struct prefetch_target {
    const struct omni_driver *driver;
    CUdevice device;
};

static CUresult prefetch_one(const struct omni_allocation *a, void *arg) {
    const struct prefetch_target *t = arg;
    if (!a->managed) return CUDA_SUCCESS; /* device-mode memory cannot move */
    return omni_prefetch(t->driver, a->ptr, a->size, t->device);
}

static int prefetch_all(CUdevice device) {
    const struct omni_driver *d = omni_driver();
    if (!d) return CUDA_ERROR_NOT_INITIALIZED;
    struct prefetch_target target = {.driver = d, .device = device};
    return omni_map_each(prefetch_one, &target);
}

OMNI_API int omni_prefetch_to_device(int device) {
    if (device < 0) return CUDA_ERROR_INVALID_VALUE;
    return prefetch_all(device);
}

OMNI_API int omni_prefetch_to_host(void) { return prefetch_all(CU_DEVICE_CPU); }
