/* Resolves the real CUDA driver once, into a table of function pointers. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <string.h>

#include "omni.h"

#if defined(__x86_64__)
#define GLIBC_BASE_VERSION "GLIBC_2.2.5"
#elif defined(__aarch64__)
#define GLIBC_BASE_VERSION "GLIBC_2.17"
#else
#error "libomnicuda supports x86_64 and aarch64 Linux"
#endif

/* The newest ABI whose advise/prefetch signatures this file knows. */
#define NEWEST_KNOWN_CUDA 13000

typedef void *(*dlsym_fn)(void *, const char *);

static dlsym_fn real_dlsym;
static pthread_once_t real_dlsym_once = PTHREAD_ONCE_INIT;

static void find_real_dlsym(void) {
    /* Looking inside libc's (or libdl's) own scope skips the dlsym exported by this library. */
    void *libc = dlopen("libc.so.6", RTLD_LAZY | RTLD_NOLOAD);
    if (libc) real_dlsym = (dlsym_fn)dlvsym(libc, "dlsym", "GLIBC_2.34");
    if (!real_dlsym) {
        void *libdl = dlopen("libdl.so.2", RTLD_LAZY | RTLD_NOLOAD);
        if (libdl) real_dlsym = (dlsym_fn)dlvsym(libdl, "dlsym", GLIBC_BASE_VERSION);
    }
    if (!real_dlsym) real_dlsym = (dlsym_fn)dlvsym(RTLD_NEXT, "dlsym", GLIBC_BASE_VERSION);
}

void *omni_real_dlsym(void *handle, const char *name) {
    pthread_once(&real_dlsym_once, find_real_dlsym);
    return real_dlsym ? real_dlsym(handle, name) : NULL;
}

static struct omni_driver driver;
static bool driver_loaded;
static pthread_once_t driver_once = PTHREAD_ONCE_INIT;

static bool inside_this_library(void *fn) {
    Dl_info mine, theirs;
    return dladdr((void *)omni_driver, &mine) && dladdr(fn, &theirs) &&
           mine.dli_fbase == theirs.dli_fbase;
}

/*
 * cuGetProcAddress when the driver has it (by base name, at our ABI version), else dlsym. A driver
 * whose own references were bound to our exported hooks would hand those back; dlsym on its
 * handle then finds its real definition.
 */
static void *resolve(void *handle, int version, const char *base, const char *exported) {
    void *fn = NULL;
    if (driver.get_proc_address_v2) {
        CUdriverProcAddressQueryResult status = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
        if (driver.get_proc_address_v2(base, &fn, version, 0, &status) != CUDA_SUCCESS ||
            status != CU_GET_PROC_ADDRESS_SUCCESS)
            fn = NULL;
    } else if (driver.get_proc_address) {
        if (driver.get_proc_address(base, &fn, version, 0) != CUDA_SUCCESS) fn = NULL;
    }
    if (!fn || inside_this_library(fn)) fn = omni_real_dlsym(handle, exported);
    return fn && !inside_this_library(fn) ? fn : NULL;
}

static void load_driver(void) {
    void *handle = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!handle) {
        omni_log("cannot load libcuda.so.1 (%s); GPU allocations will fail until the NVIDIA "
                 "driver is installed or LD_LIBRARY_PATH points at it", dlerror());
        return;
    }
    CUresult (*get_version)(int *) = omni_real_dlsym(handle, "cuDriverGetVersion");
    if (!get_version || get_version(&driver.version) != CUDA_SUCCESS) {
        omni_log("libcuda.so.1 did not report its version; GPU allocations will fail");
        return;
    }
    driver.get_proc_address = omni_real_dlsym(handle, "cuGetProcAddress");
    if (driver.version >= 12000) driver.get_proc_address_v2 = omni_real_dlsym(handle, "cuGetProcAddress_v2");

    int abi = driver.version < NEWEST_KNOWN_CUDA ? driver.version : NEWEST_KNOWN_CUDA;
    driver.location_api = abi >= 13000;
    driver.mem_alloc = resolve(handle, abi, "cuMemAlloc", "cuMemAlloc_v2");
    driver.mem_alloc_pitch = resolve(handle, abi, "cuMemAllocPitch", "cuMemAllocPitch_v2");
    driver.mem_alloc_managed = resolve(handle, abi, "cuMemAllocManaged", "cuMemAllocManaged");
    driver.mem_free = resolve(handle, abi, "cuMemFree", "cuMemFree_v2");
    driver.mem_get_info = resolve(handle, abi, "cuMemGetInfo", "cuMemGetInfo_v2");
    driver.ctx_get_device = resolve(handle, abi, "cuCtxGetDevice", "cuCtxGetDevice");
    driver.mem_advise = resolve(handle, abi, "cuMemAdvise",
                                driver.location_api ? "cuMemAdvise_v2" : "cuMemAdvise");
    driver.mem_prefetch = resolve(handle, abi, "cuMemPrefetchAsync",
                                  driver.location_api ? "cuMemPrefetchAsync_v2" : "cuMemPrefetchAsync");
    driver.mem_alloc_async = resolve(handle, abi, "cuMemAllocAsync", "cuMemAllocAsync");
    driver.mem_alloc_from_pool_async =
        resolve(handle, abi, "cuMemAllocFromPoolAsync", "cuMemAllocFromPoolAsync");
    driver.mem_create = resolve(handle, abi, "cuMemCreate", "cuMemCreate");
    driver.mem_pool_create = resolve(handle, abi, "cuMemPoolCreate", "cuMemPoolCreate");

    if (!driver.mem_alloc || !driver.mem_alloc_managed || !driver.mem_free || !driver.mem_get_info) {
        omni_log("libcuda.so.1 (version %d) lacks cuMemAlloc/cuMemAllocManaged/cuMemFree/"
                 "cuMemGetInfo; GPU allocations will fail", driver.version);
        return;
    }
    driver_loaded = true;
}

const struct omni_driver *omni_driver(void) {
    pthread_once(&driver_once, load_driver);
    return driver_loaded ? &driver : NULL;
}

CUresult omni_advise_preferred(const struct omni_driver *d, CUdeviceptr ptr, size_t size,
                               CUdevice device) {
    if (!d->mem_advise) return CUDA_ERROR_NOT_SUPPORTED;
    if (d->location_api) {
        CUmemLocation where = {.type = CU_MEM_LOCATION_TYPE_DEVICE, .id = device};
        return ((mem_advise_location_fn)d->mem_advise)(ptr, size,
                                                       CU_MEM_ADVISE_SET_PREFERRED_LOCATION, where);
    }
    return ((mem_advise_device_fn)d->mem_advise)(ptr, size, CU_MEM_ADVISE_SET_PREFERRED_LOCATION,
                                                 device);
}

/* device == CU_DEVICE_CPU moves the range to host memory. */
CUresult omni_prefetch(const struct omni_driver *d, CUdeviceptr ptr, size_t size, CUdevice device) {
    if (!d->mem_prefetch) return CUDA_ERROR_NOT_SUPPORTED;
    if (d->location_api) {
        CUmemLocation where = device == CU_DEVICE_CPU
                                  ? (CUmemLocation){.type = CU_MEM_LOCATION_TYPE_HOST, .id = 0}
                                  : (CUmemLocation){.type = CU_MEM_LOCATION_TYPE_DEVICE, .id = device};
        return ((mem_prefetch_location_fn)d->mem_prefetch)(ptr, size, where, 0, NULL);
    }
    return ((mem_prefetch_device_fn)d->mem_prefetch)(ptr, size, device, NULL);
}
