/* A simulated NVIDIA management library (libnvidia-ml.so.1) for tests on machines without a
 * GPU: the five functions the engine's NVML meter calls, with NVML's C signatures and return
 * codes (0 success, 1 uninitialised, 2 invalid argument, 999 unknown), and
 * total-energy counters in millijoules that start at a driver-load offset (GPU i: (i + 1) *
 * 1,000,000 mJ) and grow as GPUs drawing constant power would.
 *
 * Set through the environment when nvmlInit_v2 runs:
 *   SIMULATED_NVML_GPUS         devices (default 2, at most 64)
 *   SIMULATED_NVML_WATTS        each GPU's power (default 300; GPU i draws (i + 1) times it)
 *   SIMULATED_NVML_INIT_ERROR   nvmlInit_v2 returns this code instead of success
 *   SIMULATED_NVML_LOG          a file that gets "<gpu> <counter mJ>" for every counter read
 * or from a test that loads the same library, through simulated_nvml_configure (manual
 * counters that only simulated_nvml_add moves, and a device whose reads fail),
 * simulated_nvml_fail and simulated_nvml_init_error.
 *
 * Built by the tests with `cc -shared -fPIC`; not part of any product. */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define MAX_GPUS 64

/* NVML counts its initialisations: the library works until as many shutdowns. */
static unsigned refs;
static int initialised;
static int init_error = -1;
static unsigned gpus = 2;
static uint64_t watts = 300;
static int manual;
static int failing = -1;
static uint64_t manual_mj[MAX_GPUS];
static struct timespec start;
static FILE *log_file;

/* Device handles are pointers into this array (NVML's are opaque pointers too). */
static char handles[MAX_GPUS];

static uint64_t env_u64(const char *name, uint64_t fallback) {
    const char *v = getenv(name);
    return v && *v ? strtoull(v, NULL, 10) : fallback;
}

int nvmlInit_v2(void) {
    int err = init_error >= 0 ? init_error : (int)env_u64("SIMULATED_NVML_INIT_ERROR", 0);
    if (err) {
        return err;
    }
    if (refs++ == 0 && !manual) {
        gpus = (unsigned)env_u64("SIMULATED_NVML_GPUS", 2);
        if (gpus > MAX_GPUS) {
            gpus = MAX_GPUS;
        }
        watts = env_u64("SIMULATED_NVML_WATTS", 300);
        clock_gettime(CLOCK_MONOTONIC, &start);
        const char *path = getenv("SIMULATED_NVML_LOG");
        if (path && *path && !log_file) {
            log_file = fopen(path, "a");
        }
    }
    initialised = 1;
    return 0;
}

int nvmlShutdown(void) {
    if (refs == 0) {
        return 1;
    }
    if (--refs == 0) {
        initialised = 0;
    }
    return 0;
}

int nvmlDeviceGetCount_v2(unsigned *count) {
    if (!initialised) {
        return 1;
    }
    if (!count) {
        return 2;
    }
    *count = gpus;
    return 0;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned index, void **device) {
    if (!initialised) {
        return 1;
    }
    if (!device || index >= gpus) {
        return 2;
    }
    *device = &handles[index];
    return 0;
}

int nvmlDeviceGetTotalEnergyConsumption(void *device, unsigned long long *energy_mj) {
    if (!initialised) {
        return 1;
    }
    uintptr_t at = (uintptr_t)device, first = (uintptr_t)handles;
    if (!energy_mj || at < first || at >= first + gpus) {
        return 2;
    }
    unsigned i = (unsigned)(at - first);
    if ((int)i == failing) {
        return 999;
    }
    uint64_t mj;
    if (manual) {
        mj = manual_mj[i];
    } else {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        uint64_t us = (uint64_t)(now.tv_sec - start.tv_sec) * 1000000u +
                      (uint64_t)(now.tv_nsec / 1000) - (uint64_t)(start.tv_nsec / 1000);
        /* W × µs / 1000 = mJ */
        mj = (uint64_t)(i + 1) * 1000000u + (uint64_t)(i + 1) * watts * us / 1000u;
    }
    if (log_file) {
        fprintf(log_file, "%u %llu\n", i, (unsigned long long)mj);
        fflush(log_file);
    }
    *energy_mj = mj;
    return 0;
}

/* Test control: manual counters for `n` GPUs (each at its driver-load offset), reads of GPU
 * `fail` failing (-1: none). */
void simulated_nvml_configure(unsigned n, int fail) {
    manual = 1;
    gpus = n > MAX_GPUS ? MAX_GPUS : n;
    failing = fail;
    for (unsigned i = 0; i < MAX_GPUS; i++) {
        manual_mj[i] = (uint64_t)(i + 1) * 1000000u;
    }
}

/* Test control: GPU `i`'s manual counter grows by `mj`. */
void simulated_nvml_add(unsigned i, uint64_t mj) {
    if (i < MAX_GPUS) {
        manual_mj[i] += mj;
    }
}

/* Test control: which GPU's reads fail (-1: none). */
void simulated_nvml_fail(int i) {
    failing = i;
}

/* Test control: the code nvmlInit_v2 returns (-1: the environment's, else success). */
void simulated_nvml_init_error(int code) {
    init_error = code;
}
