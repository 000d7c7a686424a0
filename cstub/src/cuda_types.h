/* The few CUDA driver API types and constants libomnicuda needs, so it builds without cuda.h. */
#ifndef OMNI_CUDA_TYPES_H
#define OMNI_CUDA_TYPES_H

#include <stddef.h>
#include <stdint.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void *CUstream;
typedef void *CUmemoryPool;
typedef unsigned long long CUmemGenericAllocationHandle;
typedef int CUdriverProcAddressQueryResult;

/* CUDA 13 made the unversioned cuMemAdvise/cuMemPrefetchAsync take this instead of a device. */
typedef struct {
    int type;
    int id;
} CUmemLocation;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_SUPPORTED = 801,
};

enum { CU_GET_PROC_ADDRESS_SUCCESS = 0, CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND = 1 };

#define CU_MEM_ATTACH_GLOBAL 0x1
#define CU_MEM_ADVISE_SET_PREFERRED_LOCATION 3
#define CU_MEM_LOCATION_TYPE_DEVICE 1
#define CU_MEM_LOCATION_TYPE_HOST 2
#define CU_DEVICE_CPU (-1)

#endif
