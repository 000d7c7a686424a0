/* The per-process usage region in /dev/shm that the runtime reads without talking to us. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "omni.h"

static struct omni_region private_counters;
struct omni_region *omni_counters = &private_counters;

static char region_path[PATH_MAX];
static pid_t region_owner;

static void region_path_for(pid_t pid, char *path, size_t size) {
    const char *name = getenv("OMNI_GPU_SHM_NAME");
    /* After a fork the child gets its own region, whatever the parent's name was. */
    if (name && *name && region_owner == 0) {
        if (strchr(name, '/'))
            snprintf(path, size, "%s", name);
        else
            snprintf(path, size, "/dev/shm/%s", name);
    } else {
        snprintf(path, size, "/dev/shm/omni-gpu-%d", (int)pid);
    }
}

void omni_region_open(void) {
    pid_t pid = getpid();
    char path[PATH_MAX];
    region_path_for(pid, path, sizeof path);
    /* A fresh file of our own: never follow a link someone planted at this predictable name. */
    unlink(path);
    int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        omni_log("cannot create the usage region %s (%m); the runtime will not see this "
                 "process's GPU memory", path);
        return;
    }
    struct omni_region *region = MAP_FAILED;
    if (ftruncate(fd, sizeof *region) == 0)
        region = mmap(NULL, sizeof *region, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (region == MAP_FAILED) {
        omni_log("cannot map the usage region %s (%m)", path);
        unlink(path);
        return;
    }
    struct omni_region *previous = omni_counters;
    region->version = OMNI_REGION_VERSION;
    region->pid = (uint64_t)pid;
    region->quota = __atomic_load_n(&previous->quota, __ATOMIC_RELAXED);
    region->used = __atomic_load_n(&previous->used, __ATOMIC_RELAXED);
    region->peak = __atomic_load_n(&previous->peak, __ATOMIC_RELAXED);
    region->count = __atomic_load_n(&previous->count, __ATOMIC_RELAXED);
    region->failures = __atomic_load_n(&previous->failures, __ATOMIC_RELAXED);
    __atomic_store_n(&region->magic, OMNI_REGION_MAGIC, __ATOMIC_RELEASE);
    __atomic_store_n(&omni_counters, region, __ATOMIC_RELEASE);
    if (previous != &private_counters) munmap(previous, sizeof *previous);
    snprintf(region_path, sizeof region_path, "%s", path);
    region_owner = pid;
}

void omni_region_close(void) {
    if (region_owner == getpid() && region_path[0]) unlink(region_path);
}
