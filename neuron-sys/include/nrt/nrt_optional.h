/*
 * neuron-sys: libnrt functions that only some runtime releases export.
 *
 * Each is resolved separately at run time; a missing one is not an error.
 * nrt_get_vnc_memory_stats is deliberately left out: its signature is not
 * documented stably enough to declare here. The explicit async API (nrta_*)
 * changed signature between releases and is left out as well.
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

#ifdef __cplusplus
}
#endif

#endif /* NEURON_SYS_NRT_OPTIONAL_H */
