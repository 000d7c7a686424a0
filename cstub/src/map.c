/* Pointer -> allocation record: a chained hash table split into independently locked shards. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>

#include "omni.h"

#define SHARDS 64
#define BUCKETS_PER_SHARD 1024

struct entry {
    struct omni_allocation allocation;
    struct entry *next;
};

struct shard {
    pthread_mutex_t lock;
    struct entry *buckets[BUCKETS_PER_SHARD];
};

static struct shard shards[SHARDS] = {
    [0 ... SHARDS - 1] = {.lock = PTHREAD_MUTEX_INITIALIZER},
};

static uint64_t mix(CUdeviceptr ptr) {
    /* Device pointers are 256-byte aligned or better; mixing spreads them over all buckets. */
    uint64_t h = (uint64_t)ptr * 0x9e3779b97f4a7c15ull;
    return h ^ (h >> 29);
}

static struct shard *shard_for(uint64_t h) { return &shards[h % SHARDS]; }
static size_t bucket_for(uint64_t h) { return (h / SHARDS) % BUCKETS_PER_SHARD; }

void omni_map_insert(const struct omni_allocation *a) {
    struct entry *e = malloc(sizeof *e);
    if (!e) {
        omni_log("out of host memory tracking a %zu-byte GPU allocation; it will not be "
                 "counted when freed", a->size);
        return;
    }
    e->allocation = *a;
    uint64_t h = mix(a->ptr);
    struct shard *s = shard_for(h);
    pthread_mutex_lock(&s->lock);
    e->next = s->buckets[bucket_for(h)];
    s->buckets[bucket_for(h)] = e;
    pthread_mutex_unlock(&s->lock);
}

bool omni_map_remove(CUdeviceptr ptr, struct omni_allocation *out) {
    uint64_t h = mix(ptr);
    struct shard *s = shard_for(h);
    struct entry *found = NULL;
    pthread_mutex_lock(&s->lock);
    for (struct entry **link = &s->buckets[bucket_for(h)]; *link; link = &(*link)->next) {
        if ((*link)->allocation.ptr == ptr) {
            found = *link;
            *link = found->next;
            break;
        }
    }
    pthread_mutex_unlock(&s->lock);
    if (!found) return false;
    *out = found->allocation;
    free(found);
    return true;
}

CUresult omni_map_each(CUresult (*visit)(const struct omni_allocation *, void *), void *arg) {
    CUresult first_error = CUDA_SUCCESS;
    for (size_t i = 0; i < SHARDS; i++) {
        pthread_mutex_lock(&shards[i].lock);
        for (size_t b = 0; b < BUCKETS_PER_SHARD; b++) {
            for (struct entry *e = shards[i].buckets[b]; e; e = e->next) {
                CUresult rc = visit(&e->allocation, arg);
                if (rc != CUDA_SUCCESS && first_error == CUDA_SUCCESS) first_error = rc;
            }
        }
        pthread_mutex_unlock(&shards[i].lock);
    }
    return first_error;
}
