/* Internal interfaces shared by the translation units of libomnicuda. */
#ifndef OMNI_H
#define OMNI_H

#include <stdbool.h>
#include <stdint.h>

#include "cuda_types.h"

#define OMNI_API __attribute__((visibility("default")))

/* ---- driver.c: the real driver, resolved once at run time ---- */

typedef CUresult (*get_proc_address_v1_fn)(const char *, void **, int, uint64_t);
typedef CUresult (*get_proc_address_v2_fn)(const char *, void **, int, uint64_t,
                                           CUdriverProcAddressQueryResult *);
typedef CUresult (*mem_advise_device_fn)(CUdeviceptr, size_t, int, CUdevice);
typedef CUresult (*mem_advise_location_fn)(CUdeviceptr, size_t, int, CUmemLocation);
typedef CUresult (*mem_prefetch_device_fn)(CUdeviceptr, size_t, CUdevice, CUstream);
typedef CUresult (*mem_prefetch_location_fn)(CUdeviceptr, size_t, CUmemLocation, unsigned int,
                                             CUstream);

struct omni_driver {
    int version;        /* from cuDriverGetVersion, e.g. 12040 */
    bool location_api;  /* advise/prefetch take a CUmemLocation (CUDA 13 and later) */
    get_proc_address_v1_fn get_proc_address;
    get_proc_address_v2_fn get_proc_address_v2;
    CUresult (*mem_alloc)(CUdeviceptr *, size_t);
    CUresult (*mem_alloc_pitch)(CUdeviceptr *, size_t *, size_t, size_t, unsigned int);
    CUresult (*mem_alloc_managed)(CUdeviceptr *, size_t, unsigned int);
    CUresult (*mem_free)(CUdeviceptr);
    CUresult (*mem_get_info)(size_t *, size_t *);
    CUresult (*ctx_get_device)(CUdevice *);
    void *mem_advise;   /* mem_advise_device_fn or mem_advise_location_fn */
    void *mem_prefetch; /* mem_prefetch_device_fn or mem_prefetch_location_fn */
    CUresult (*mem_alloc_async)(CUdeviceptr *, size_t, CUstream);
    CUresult (*mem_alloc_from_pool_async)(CUdeviceptr *, size_t, CUmemoryPool, CUstream);
    CUresult (*mem_create)(CUmemGenericAllocationHandle *, size_t, const void *, unsigned long long);
    CUresult (*mem_pool_create)(CUmemoryPool *, const void *);
};

/* The real driver, or NULL (after one log line) when libcuda.so.1 cannot be loaded. */
const struct omni_driver *omni_driver(void);
/* glibc's own dlsym, never the one this library exports. */
void *omni_real_dlsym(void *handle, const char *name);
CUresult omni_advise_preferred(const struct omni_driver *d, CUdeviceptr ptr, size_t size,
                               CUdevice device);
CUresult omni_prefetch(const struct omni_driver *d, CUdeviceptr ptr, size_t size, CUdevice device);

/* ---- region.c: counters, kept in the shared-memory region when there is one ---- */

#define OMNI_REGION_MAGIC 0x494e4d4fu /* "OMNI" read as little-endian bytes */
#define OMNI_REGION_VERSION 1u

struct omni_region {
    uint32_t magic;
    uint32_t version;
    uint64_t pid;
    uint64_t quota; /* bytes; 0 means no quota */
    uint64_t used;
    uint64_t peak;
    uint64_t count; /* live allocations */
    uint64_t failures;
    uint64_t reserved;
};

extern struct omni_region *omni_counters;
void omni_region_open(void);
void omni_region_close(void);

/* ---- map.c: pointer -> allocation record, thread-safe ---- */

struct omni_allocation {
    CUdeviceptr ptr;
    size_t size;
    CUdevice device;
    bool managed;
};

void omni_map_insert(const struct omni_allocation *a);
bool omni_map_remove(CUdeviceptr ptr, struct omni_allocation *out);
/* Calls visit on every allocation, with that part of the map locked; returns the first error. */
CUresult omni_map_each(CUresult (*visit)(const struct omni_allocation *, void *), void *arg);

/* ---- core.c: the one allocation path every front end uses ---- */

enum omni_mode { OMNI_MODE_MANAGED = 0, OMNI_MODE_DEVICE = 1 };

extern enum omni_mode omni_mode;
void omni_config_from_env(void);
bool omni_reserve(size_t size);
void omni_unreserve(size_t size);
void omni_record_failure(void);
void omni_track(CUdeviceptr ptr, size_t size, CUdevice device, bool managed);
CUresult omni_alloc(CUdeviceptr *out, size_t size, CUdevice device);
CUresult omni_free(CUdeviceptr ptr);
CUresult omni_mem_info(size_t *free_bytes, size_t *total_bytes);
CUdevice omni_current_device(const struct omni_driver *d);

/* ---- log.c ---- */

void omni_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
bool omni_parse_size(const char *text, uint64_t *out);

#endif
