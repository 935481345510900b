/*
 * neuron-sys: the core C API of the Neuron runtime (libnrt).
 *
 * This is the project's own header, written from the publicly documented
 * interface facts (names, signatures, numeric values, layouts). It declares
 * only the core set the worker requires; functions that not every runtime
 * release exports are in nrt_optional.h.
 *
 * Usage contract (from the runtime's documentation): one runtime per process,
 * nrt_init first and nrt_close last; not fork-safe; NeuronCores are held
 * exclusively by the process that initialised them.
 */
#ifndef NEURON_SYS_NRT_H
#define NEURON_SYS_NRT_H

#include <stddef.h>
#include <stdint.h>

#include "nrt_status.h"
#include "nrt_version.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Longest tensor name, including the terminating NUL. */
#define NRT_TENSOR_NAME_MAX 256

/* A loaded model (opaque). */
typedef struct nrt_model nrt_model_t;

/* A tensor in device or host memory (opaque). */
typedef struct nrt_tensor nrt_tensor_t;

/* A set of named tensors passed to nrt_execute (the runtime uses a void pointer). */
typedef void nrt_tensor_set_t;

/* Where a tensor's memory lives. */
typedef enum {
    NRT_TENSOR_PLACEMENT_DEVICE = 0,
    NRT_TENSOR_PLACEMENT_HOST = 1, /* deprecated */
    NRT_TENSOR_PLACEMENT_VIRTUAL = 2
} nrt_tensor_placement_t;

/* The framework that initialises the runtime. */
typedef enum {
    NRT_FRAMEWORK_TYPE_INVALID = 0,
    NRT_FRAMEWORK_TYPE_NO_FW = 1,
    NRT_FRAMEWORK_TYPE_TENSORFLOW = 2,
    NRT_FRAMEWORK_TYPE_PYTORCH = 3,
    NRT_FRAMEWORK_TYPE_MXNET = 4,
    NRT_FRAMEWORK_TYPE_PRECHECK = 5 /* newer runtimes only */
} nrt_framework_type_t;

/* Whether a model tensor is an input or an output. */
typedef enum {
    NRT_TENSOR_USAGE_INPUT = 0,
    NRT_TENSOR_USAGE_OUTPUT = 1
} nrt_tensor_usage_t;

/*
 * A tensor's element type as reported by the runtime. Two incompatible
 * numberings exist (runtimes up to SDK 2.27 and from 2.28 on), so this
 * project declares it as a plain 4-byte integer and never interprets it:
 * element types come from the model's own configuration, cross-checked
 * against `size`.
 */
typedef uint32_t nrt_dtype_t;

/* One input or output of a loaded model. */
typedef struct nrt_tensor_info {
    char name[NRT_TENSOR_NAME_MAX];
    nrt_tensor_usage_t usage;
    size_t size; /* bytes */
    nrt_dtype_t dtype;
    uint32_t *shape;
    uint32_t ndim;
} nrt_tensor_info_t;

/* Every input and output of a loaded model. */
typedef struct nrt_tensor_info_array {
    uint64_t tensor_count;
    nrt_tensor_info_t tensor_array[];
} nrt_tensor_info_array_t;

/*
 * Device memory of one (virtual) NeuronCore, filled by nrt_get_vnc_memory_stats
 * (nrt_optional.h). Newer runtimes may append fields: callers pass the size
 * they expect and learn the size written.
 */
typedef struct nrt_vnc_memory_stats {
    size_t bytes_used;
    size_t bytes_limit;
} nrt_vnc_memory_stats_t;

/* Runtime lifetime. nrt_init reads the NEURON_RT_* environment. */
NRT_STATUS nrt_init(nrt_framework_type_t framework, const char *fw_version, const char *fal_version);
void nrt_close(void);

/*
 * Models. Core indices are relative to the cores visible to this process; a
 * start of -1 lets the runtime choose. The core count is deprecated: AWS's
 * header says always pass -1.
 */
NRT_STATUS nrt_load(const void *neff_bytes, size_t size, int32_t start_nc, int32_t nc_count, nrt_model_t **model);
NRT_STATUS nrt_unload(nrt_model_t *model);

/* Core counts; both may be called before nrt_init. */
NRT_STATUS nrt_get_total_nc_count(uint32_t *nc_count);
NRT_STATUS nrt_get_visible_nc_count(uint32_t *nc_count);

/* A loaded model's inputs and outputs; free with nrt_free_model_tensor_info. */
NRT_STATUS nrt_get_model_tensor_info(nrt_model_t *model, nrt_tensor_info_array_t **tensor_info);
NRT_STATUS nrt_free_model_tensor_info(nrt_tensor_info_array_t *tensor_info);

/* Tensor sets. A tensor added to a set must outlive the set. */
NRT_STATUS nrt_allocate_tensor_set(nrt_tensor_set_t **result);
void nrt_destroy_tensor_set(nrt_tensor_set_t **tensor_set);
NRT_STATUS nrt_add_tensor_to_tensor_set(nrt_tensor_set_t *tensor_set, const char *tensor_name, nrt_tensor_t *tensor);
NRT_STATUS nrt_get_tensor_from_tensor_set(nrt_tensor_set_t *tensor_set, const char *tensor_name, nrt_tensor_t **tensor);

/* Tensors. Allocations of 4 GiB or more are a known runtime bug. */
NRT_STATUS nrt_tensor_allocate(nrt_tensor_placement_t placement, int logical_nc_id, size_t size, const char *name,
                               nrt_tensor_t **tensor);
void nrt_tensor_free(nrt_tensor_t **tensor);
NRT_STATUS nrt_tensor_read(const nrt_tensor_t *tensor, void *buf, size_t offset, size_t size);
NRT_STATUS nrt_tensor_write(nrt_tensor_t *tensor, const void *buf, size_t offset, size_t size);
size_t nrt_tensor_get_size(const nrt_tensor_t *tensor);
NRT_STATUS nrt_tensor_allocate_empty(const char *name, nrt_tensor_t **tensor);
/* The caller keeps ownership of `buffer`, which must outlive the tensor. */
NRT_STATUS nrt_tensor_attach_buffer(nrt_tensor_t *tensor, void *buffer, size_t size);

/* Execution. Several threads may execute one model; the runtime pipelines them. */
NRT_STATUS nrt_execute(nrt_model_t *model, const nrt_tensor_set_t *input_set, nrt_tensor_set_t *output_set);
NRT_STATUS nrt_execute_repeat(nrt_model_t *model, const nrt_tensor_set_t *input_set, nrt_tensor_set_t *output_set,
                              int repeat_count);

/* The runtime's version; `size` is sizeof(nrt_version_t). */
NRT_STATUS nrt_get_version(nrt_version_t *ver, size_t size);

#ifdef __cplusplus
}
#endif

#endif /* NEURON_SYS_NRT_H */
