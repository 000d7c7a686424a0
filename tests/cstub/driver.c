/*
 * Scenarios run against libomnicuda's LD_PRELOAD front end. Linked against the fake libcuda.so.1
 * like a CUDA program would be, and run with LD_PRELOAD=libomnicuda.so. Prints key=value lines.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;

CUresult cuInit(unsigned int flags);
CUresult cuMemAlloc_v2(CUdeviceptr *ptr, size_t size);
CUresult cuMemAllocPitch_v2(CUdeviceptr *ptr, size_t *pitch, size_t width, size_t height,
                            unsigned int element_size);
CUresult cuMemFree_v2(CUdeviceptr ptr);
CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total_bytes);
CUresult cuGetProcAddress(const char *symbol, void **pfn, int version, unsigned long long flags);
CUresult cuGetProcAddress_v2(const char *symbol, void **pfn, int version, unsigned long long flags,
                             int *status);
long long fake_cuda_counter(const char *name);

typedef CUresult (*alloc_fn)(CUdeviceptr *, size_t);
typedef CUresult (*get_proc_v2_fn)(const char *, void **, int, unsigned long long, int *);

struct omni_usage {
    uint64_t pid, quota, used, peak, count, failures;
};

static void print_usage(void) {
    void (*get_usage)(struct omni_usage *) = dlsym(RTLD_DEFAULT, "omni_get_usage");
    if (!get_usage) {
        printf("hooks=absent\n");
        return;
    }
    struct omni_usage u;
    get_usage(&u);
    printf("used=%llu\npeak=%llu\ncount=%llu\nfailures=%llu\nquota=%llu\n",
           (unsigned long long)u.used, (unsigned long long)u.peak, (unsigned long long)u.count,
           (unsigned long long)u.failures, (unsigned long long)u.quota);
}

static void print_fake(const char *name) { printf("fake_%s=%lld\n", name, fake_cuda_counter(name)); }

static void print_info(const char *prefix) {
    size_t free_bytes = 0, total_bytes = 0;
    CUresult rc = cuMemGetInfo_v2(&free_bytes, &total_bytes);
    printf("%sinfo_rc=%d\n%sfree=%zu\n%stotal=%zu\n", prefix, rc, prefix, free_bytes, prefix,
           total_bytes);
}

static int quota(size_t size, int n) {
    CUdeviceptr *ptrs = calloc((size_t)n, sizeof *ptrs);
    int ok = 0, first_error = 0;
    for (int i = 0; i < n; i++) {
        CUresult rc = cuMemAlloc_v2(&ptrs[i], size);
        if (rc == 0) ok++;
        else if (!first_error) first_error = rc;
    }
    printf("ok=%d\nfirst_error=%d\n", ok, first_error);
    print_info("");
    print_usage();
    print_fake("managed_allocs");
    print_fake("device_allocs");
    print_fake("advise_device_calls");
    print_fake("advise_location_calls");
    print_fake("last_advise_device");
    print_fake("last_managed_flags");
    for (int i = 0; i < n; i++)
        if (ptrs[i]) cuMemFree_v2(ptrs[i]);
    print_info("after_");
    printf("after_used=%llu\n", 0ull + (unsigned long long)fake_cuda_counter("live_bytes"));
    free(ptrs);
    return 0;
}

static int through_dlsym(size_t size) {
    void *libcuda = dlopen("libcuda.so.1", RTLD_NOW);
    alloc_fn alloc = (alloc_fn)dlsym(libcuda, "cuMemAlloc_v2");
    alloc_fn direct = (alloc_fn)dlsym(libcuda, "cuMemAllocManaged");
    CUdeviceptr a = 0, b = 0;
    printf("dlsym_rc=%d\n", alloc(&a, size));
    printf("dlsym_rc2=%d\n", alloc(&b, size));
    printf("passthrough=%d\n", direct != NULL && dlsym(libcuda, "cuNoSuchEntry") == NULL);
    print_usage();
    return 0;
}

static int through_get_proc_address(size_t size) {
    void *pfn = NULL;
    CUdeviceptr a = 0, b = 0, c = 0;
    printf("lookup_rc=%d\n", cuGetProcAddress_v2("cuMemAlloc", &pfn, 12000, 0, NULL));
    printf("alloc_rc=%d\n", ((alloc_fn)pfn)(&a, size));
    int status = -1;
    CUresult rc = cuGetProcAddress_v2("cuMemAlloc", &pfn, 12000, 0, &status);
    printf("lookup2_rc=%d\nstatus=%d\n", rc, status);
    printf("alloc2_rc=%d\n", ((alloc_fn)pfn)(&b, size));
    void *getter = NULL;
    cuGetProcAddress_v2("cuGetProcAddress", &getter, 12000, 0, NULL);
    pfn = NULL;
    ((get_proc_v2_fn)getter)("cuMemAlloc", &pfn, 12000, 0, NULL);
    printf("via_getter_rc=%d\n", ((alloc_fn)pfn)(&c, size));
    pfn = NULL;
    printf("v1_rc=%d\n", cuGetProcAddress("cuMemAlloc", &pfn, 12000, 0));
    printf("v1_alloc_rc=%d\n", ((alloc_fn)pfn)(&c, size));
    pfn = (void *)1;
    rc = cuGetProcAddress_v2("cuNoSuchEntry", &pfn, 12000, 0, NULL);
    printf("unknown_rc=%d\nunknown_null=%d\n", rc, pfn == NULL);
    print_usage();
    return 0;
}

struct worker {
    int rounds;
    int keep;
    size_t size;
    CUdeviceptr kept[64];
    int errors;
};

static void *churn(void *arg) {
    struct worker *w = arg;
    for (int i = 0; i < w->rounds; i++) {
        CUdeviceptr p;
        if (cuMemAlloc_v2(&p, w->size + (size_t)(i % 7)) != 0 || cuMemFree_v2(p) != 0) w->errors++;
    }
    for (int i = 0; i < w->keep; i++)
        if (cuMemAlloc_v2(&w->kept[i], w->size) != 0) w->errors++;
    return NULL;
}

static int threads(int count, int rounds, size_t size, int keep) {
    pthread_t ids[64];
    struct worker workers[64];
    for (int t = 0; t < count; t++) {
        workers[t] = (struct worker){.rounds = rounds, .keep = keep, .size = size};
        pthread_create(&ids[t], NULL, churn, &workers[t]);
    }
    int errors = 0;
    for (int t = 0; t < count; t++) {
        pthread_join(ids[t], NULL);
        errors += workers[t].errors;
    }
    printf("errors=%d\n", errors);
    print_usage();
    print_fake("live_bytes");
    for (int t = 0; t < count; t++)
        for (int i = 0; i < keep; i++) cuMemFree_v2(workers[t].kept[i]);
    printf("final_live=%lld\n", fake_cuda_counter("live_bytes"));
    void (*get_usage)(struct omni_usage *) = dlsym(RTLD_DEFAULT, "omni_get_usage");
    struct omni_usage u;
    get_usage(&u);
    printf("final_used=%llu\nfinal_count=%llu\n", (unsigned long long)u.used,
           (unsigned long long)u.count);
    return 0;
}

static int hold(size_t size) {
    CUdeviceptr p;
    printf("rc=%d\nready=1\n", cuMemAlloc_v2(&p, size));
    fflush(stdout);
    char byte;
    return read(STDIN_FILENO, &byte, 1) < 0;
}

static int prefetch(size_t size, int n) {
    CUdeviceptr p;
    for (int i = 0; i < n; i++) cuMemAlloc_v2(&p, size);
    int (*to_host)(void) = dlsym(RTLD_DEFAULT, "omni_prefetch_to_host");
    int (*to_device)(int) = dlsym(RTLD_DEFAULT, "omni_prefetch_to_device");
    printf("to_host_rc=%d\n", to_host());
    printf("to_device_rc=%d\n", to_device(0));
    const char *names[] = {"prefetch_device_calls", "prefetch_location_calls", "prefetch_to_host",
                           "prefetch_to_gpu", "advise_device_calls", "advise_location_calls",
                           "bad_locations"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) print_fake(names[i]);
    return 0;
}

static int async_refused(size_t size) {
    void *pfn = NULL;
    CUdeviceptr p;
    cuGetProcAddress_v2("cuMemAllocAsync", &pfn, 12000, 0, NULL);
    CUresult (*alloc_async)(CUdeviceptr *, size_t, void *) = pfn;
    printf("async_rc=%d\n", alloc_async(&p, size, NULL));
    printf("async_rc2=%d\n", alloc_async(&p, size, NULL));
    print_fake("async_allocs");
    print_usage();
    return 0;
}

static int pitch(size_t width, size_t height) {
    CUdeviceptr p;
    size_t row = 0;
    printf("pitch_rc=%d\n", cuMemAllocPitch_v2(&p, &row, width, height, 4));
    printf("pitch=%zu\n", row);
    print_usage();
    print_fake("pitch_allocs");
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    cuInit(0);
    const char *scenario = argv[1];
    size_t size = argc > 2 ? strtoull(argv[2], NULL, 10) : 0;
    int n = argc > 3 ? atoi(argv[3]) : 1;
    if (strcmp(scenario, "quota") == 0) return quota(size, n);
    if (strcmp(scenario, "dlsym") == 0) return through_dlsym(size);
    if (strcmp(scenario, "procaddr") == 0) return through_get_proc_address(size);
    if (strcmp(scenario, "threads") == 0)
        return threads(atoi(argv[2]), atoi(argv[3]), strtoull(argv[4], NULL, 10), atoi(argv[5]));
    if (strcmp(scenario, "hold") == 0) return hold(size);
    if (strcmp(scenario, "prefetch") == 0) return prefetch(size, n);
    if (strcmp(scenario, "async") == 0) return async_refused(size);
    if (strcmp(scenario, "pitch") == 0) return pitch(size, (size_t)n);
    fprintf(stderr, "unknown scenario %s\n", scenario);
    return 2;
}
