/*
 * neuron-sys: the runtime version record filled by nrt_get_version.
 *
 * Written by this project from the publicly documented layout
 * (x86-64: 4 x 8 bytes, then 128 + 64 characters; 224 bytes in all).
 */
#ifndef NEURON_SYS_NRT_VERSION_H
#define NEURON_SYS_NRT_VERSION_H

#include <stdint.h>

#define NRT_VERSION_DETAIL_MAX 128
#define NRT_VERSION_GIT_HASH_MAX 64

typedef struct nrt_version {
    uint64_t rt_major;
    uint64_t rt_minor;
    uint64_t rt_patch;
    uint64_t rt_maintenance;
    char rt_detail[NRT_VERSION_DETAIL_MAX];
    char git_hash[NRT_VERSION_GIT_HASH_MAX];
} nrt_version_t;

#endif /* NEURON_SYS_NRT_VERSION_H */
