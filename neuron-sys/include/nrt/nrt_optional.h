/*
 * neuron-sys: libnrt functions that only some runtime releases export.
 *
 * Each is resolved separately at run time; a missing one is not an error.
 * The explicit async API (nrta_*) changed signature between releases and is
 * left out.
 */
#ifndef NEURON_SYS_NRT_OPTIONAL_H
#define NEURON_SYS_NRT_OPTIONAL_H

#include "nrt.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A static, human-readable name for a status (runtimes from SDK 2.28). */
const char *nrt_get_status_as_str(NRT_STATUS status);

/* Newer names for the core counts, counting logical NeuronCores. */
NRT_STATUS nrt_get_total_vnc_count(uint32_t *vnc_count);
NRT_STATUS nrt_get_visible_vnc_count(uint32_t *vnc_count);

/* Device profiling of one model's executions into a file. */
NRT_STATUS nrt_profile_start(nrt_model_t *model, const char *filename);
NRT_STATUS nrt_profile_stop(const char *filename);

/*
 * Copies `size` bytes between two tensors. Two device tensors must be on the
 * same NeuronCore (NRT_INVALID otherwise). Optional: not every supported
 * release is known to export it; without it, a copy is a read and a write.
 */
NRT_STATUS nrt_tensor_copy(const nrt_tensor_t *src, size_t src_offset, nrt_tensor_t *dst, size_t dst_offset,
                           size_t size);

/*
 * Device memory of one VNC. `stats_size_in` is sizeof(nrt_vnc_memory_stats_t)
 * as the caller knows it; the runtime writes at most that many bytes and
 * reports the size written. Newer releases only (the VNC-era API).
 */
NRT_STATUS nrt_get_vnc_memory_stats(uint32_t vnc, nrt_vnc_memory_stats_t *stats, size_t stats_size_in,
                                    size_t *stats_size_out);

#ifdef __cplusplus
}
#endif

#endif /* NEURON_SYS_NRT_OPTIONAL_H */
