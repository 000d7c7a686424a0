/* The one allocation path: quota check, driver call, tracking. Every front end ends here. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "omni.h"

enum omni_mode omni_mode = OMNI_MODE_MANAGED;

void omni_config_from_env(void) {
    const char *limit = getenv("OMNI_GPU_MEMORY_LIMIT");
    uint64_t quota = 0;
    if (limit && *limit && !omni_parse_size(limit, &quota))
        omni_log("OMNI_GPU_MEMORY_LIMIT=%s is not a size (use bytes, or units such as 512MiB or "
                 "2GiB); running without a quota", limit);
    __atomic_store_n(&omni_counters->quota, quota, __ATOMIC_RELAXED);

    const char *mode = getenv("OMNI_CUDA_MODE");
    if (!mode || !*mode || strcmp(mode, "managed") == 0) {
        omni_mode = OMNI_MODE_MANAGED;
    } else if (strcmp(mode, "device") == 0) {
        omni_mode = OMNI_MODE_DEVICE;
    } else {
        omni_log("OMNI_CUDA_MODE=%s is not 'managed' or 'device'; using managed", mode);
        omni_mode = OMNI_MODE_MANAGED;
    }
}

bool omni_reserve(size_t size) {
    struct omni_region *c = omni_counters;
    uint64_t used = __atomic_load_n(&c->used, __ATOMIC_RELAXED);
    uint64_t next;
    do {
        uint64_t quota = __atomic_load_n(&c->quota, __ATOMIC_RELAXED);
        next = used + size;
        if (next < used || (quota != 0 && next > quota)) return false;
    } while (!__atomic_compare_exchange_n(&c->used, &used, next, true, __ATOMIC_ACQ_REL,
                                          __ATOMIC_RELAXED));
    uint64_t peak = __atomic_load_n(&c->peak, __ATOMIC_RELAXED);
    while (next > peak && !__atomic_compare_exchange_n(&c->peak, &peak, next, true,
                                                       __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return true;
}

void omni_unreserve(size_t size) { __atomic_fetch_sub(&omni_counters->used, size, __ATOMIC_ACQ_REL); }

void omni_record_failure(void) { __atomic_fetch_add(&omni_counters->failures, 1, __ATOMIC_RELAXED); }

void omni_track(CUdeviceptr ptr, size_t size, CUdevice device, bool managed) {
    struct omni_allocation a = {.ptr = ptr, .size = size, .device = device, .managed = managed};
    omni_map_insert(&a);
    __atomic_fetch_add(&omni_counters->count, 1, __ATOMIC_RELAXED);
}

CUdevice omni_current_device(const struct omni_driver *d) {
    CUdevice device = 0;
    if (d->ctx_get_device && d->ctx_get_device(&device) != CUDA_SUCCESS) device = 0;
    return device;
}

CUresult omni_alloc(CUdeviceptr *out, size_t size, CUdevice device) {
    const struct omni_driver *d = omni_driver();
    if (!d) return CUDA_ERROR_NOT_INITIALIZED;
    if (!omni_reserve(size)) {
        omni_record_failure();
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    bool managed = omni_mode == OMNI_MODE_MANAGED;
    CUresult rc = managed ? d->mem_alloc_managed(out, size, CU_MEM_ATTACH_GLOBAL)
                          : d->mem_alloc(out, size);
    if (rc != CUDA_SUCCESS) {
        omni_unreserve(size);
        omni_record_failure();
        return rc;
    }
    /* Only a hint: the allocation is usable even where the advice is refused. */
    if (managed) (void)omni_advise_preferred(d, *out, size, device);
    omni_track(*out, size, device, managed);
    return CUDA_SUCCESS;
}

CUresult omni_free(CUdeviceptr ptr) {
    const struct omni_driver *d = omni_driver();
    if (!d) return CUDA_ERROR_NOT_INITIALIZED;
    struct omni_allocation a;
    if (!omni_map_remove(ptr, &a)) return d->mem_free(ptr); /* not ours: made before the hooks */
    CUresult rc = d->mem_free(ptr);
    if (rc != CUDA_SUCCESS) {
        omni_map_insert(&a);
        return rc;
    }
    omni_unreserve(a.size);
    __atomic_fetch_sub(&omni_counters->count, 1, __ATOMIC_RELAXED);
    return CUDA_SUCCESS;
}

CUresult omni_mem_info(size_t *free_bytes, size_t *total_bytes) {
    const struct omni_driver *d = omni_driver();
    if (!d) return CUDA_ERROR_NOT_INITIALIZED;
    size_t physical_free = 0, physical_total = 0;
    CUresult rc = d->mem_get_info(&physical_free, &physical_total);
    if (rc != CUDA_SUCCESS) return rc;
    uint64_t quota = __atomic_load_n(&omni_counters->quota, __ATOMIC_RELAXED);
    if (quota == 0) {
        *free_bytes = physical_free;
        *total_bytes = physical_total;
        return CUDA_SUCCESS;
    }
    uint64_t used = __atomic_load_n(&omni_counters->used, __ATOMIC_RELAXED);
    uint64_t total = quota < physical_total ? quota : physical_total;
    uint64_t free = total > used ? total - used : 0;
    /* Device memory cannot be over-committed, so there the card's own free bytes bound it too. */
    if (omni_mode == OMNI_MODE_DEVICE && free > physical_free) free = physical_free;
    *free_bytes = free;
    *total_bytes = total;
    return CUDA_SUCCESS;
}

static void reopen_region_in_child(void) { omni_region_open(); }

__attribute__((constructor)) static void omni_start(void) {
    omni_config_from_env();
    omni_region_open();
    pthread_atfork(NULL, NULL, reopen_region_in_child);
}

__attribute__((destructor)) static void omni_stop(void) { omni_region_close(); }
