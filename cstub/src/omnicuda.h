/* libomnicuda's public C API. Python binds the same declarations through cffi (ABI mode). */
#ifndef OMNICUDA_H
#define OMNICUDA_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

struct omni_usage {
    uint64_t pid;
    uint64_t quota; /* bytes; 0 means no quota */
    uint64_t used;
    uint64_t peak;
    uint64_t count; /* live allocations */
    uint64_t failures;
};

void *omni_torch_alloc(ssize_t size, int device, void *stream);
void omni_torch_free(void *ptr, ssize_t size, int device, void *stream);
void *omni_ort_alloc(size_t size);
void omni_ort_free(void *ptr);
void omni_ort_empty_cache(void);

int omni_set_quota(uint64_t bytes);
void omni_get_usage(struct omni_usage *out);
int omni_mode_is_managed(void);
int omni_mem_get_info(size_t *free_bytes, size_t *total_bytes);
int omni_driver_version(void);
/* Both return a CUresult: 0 on success, else the first error the driver reported. */
int omni_prefetch_to_device(int device);
int omni_prefetch_to_host(void);

#endif
