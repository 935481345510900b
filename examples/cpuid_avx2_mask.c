/*
 * cpuid_avx2_mask.c — make a process on an AVX-512 machine see an AVX2 + FMA CPU (x86-64-v3), so
 * that libraries which pick their kernels from CPUID at start-up (ONNX Runtime's MLAS, numpy, ...)
 * run their AVX2 kernels. Used by examples/bert_ort_compare.py --isa avx2 to compare our AVX2 path
 * with ONNX Runtime's AVX2 path on the same machine (docs/benchmarks.md).
 *
 *     gcc -O2 -shared -fPIC -o libcpuid_avx2_mask.so examples/cpuid_avx2_mask.c
 *     LD_PRELOAD=$PWD/libcpuid_avx2_mask.so python ...
 *
 * How: Linux's ARCH_SET_CPUID (arch_prctl(2), needs the CPU's "CPUID faulting", the `cpuid_fault`
 * flag in /proc/cpuinfo) makes the CPUID instruction raise SIGSEGV in the calling thread. The flag
 * is inherited by threads and forks the thread creates and reset by execve. The constructor below
 * runs when the library is loaded (before the program's own initialisers and before any later
 * dlopen'ed library), installs a SIGSEGV handler and turns faulting on. The handler checks that the
 * faulting instruction is CPUID (0F A2), turns faulting off for this thread, executes CPUID with
 * the trapped EAX/ECX, turns faulting back on, clears the AVX-512 / AMX / AVX10 feature bits (and
 * the newer VEX extensions an AVX2-only CPU such as Zen 3 lacks), and resumes after the
 * instruction. Any other SIGSEGV restores the default action and re-faults (a normal crash).
 *
 * Limits: code that ran CPUID before the constructor (the dynamic loader and glibc's own string
 * function selection) already saw AVX-512; for glibc set GLIBC_TUNABLES as the compare script
 * does. XGETBV (the OS-enabled register state) is not trapped: programs that test AVX-512 with
 * CPUID and XGETBV together, as MLAS does, see it absent because of the CPUID bits.
 * Set CPUID_MASK_VERBOSE=1 to print a line to stderr at start-up.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

static long set_cpuid(int enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, (unsigned long)enabled); }

/* Leaf 7 subleaf 0, EBX: AVX512F 16, DQ 17, IFMA 21, PF 26, ER 27, CD 28, BW 30, VL 31. */
#define L7_EBX_MASK ((1u << 16) | (1u << 17) | (1u << 21) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 30) | (1u << 31))
/* ECX: AVX512_VBMI 1, AVX512_VBMI2 6, AVX512_VNNI 11, AVX512_BITALG 12, AVX512_VPOPCNTDQ 14. */
#define L7_ECX_MASK ((1u << 1) | (1u << 6) | (1u << 11) | (1u << 12) | (1u << 14))
/* EDX: AVX512_4VNNIW 2, AVX512_4FMAPS 3, AVX512_VP2INTERSECT 8, AMX_BF16 22, AVX512_FP16 23,
 * AMX_TILE 24, AMX_INT8 25. */
#define L7_EDX_MASK ((1u << 2) | (1u << 3) | (1u << 8) | (1u << 22) | (1u << 23) | (1u << 24) | (1u << 25))
/* Leaf 7 subleaf 1, EAX: AVX_VNNI 4, AVX512_BF16 5, AMX_FP16 21, AVX_IFMA 23. */
#define L7S1_EAX_MASK ((1u << 4) | (1u << 5) | (1u << 21) | (1u << 23))
/* EDX: AVX_VNNI_INT8 4, AVX_NE_CONVERT 5, AMX_COMPLEX 8, AVX_VNNI_INT16 10, AVX10 19. */
#define L7S1_EDX_MASK ((1u << 4) | (1u << 5) | (1u << 8) | (1u << 10) | (1u << 19))
/* Leaf 0xD subleaf 0, EAX (XCR0 bits the CPU supports): opmask 5, ZMM_Hi256 6, Hi16_ZMM 7,
 * XTILECFG 17, XTILEDATA 18. */
#define LD_EAX_MASK ((1u << 5) | (1u << 6) | (1u << 7) | (1u << 17) | (1u << 18))

static void native_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static void masked_cpuid(uint32_t leaf, uint32_t sub, uint32_t r[4]) {
    native_cpuid(leaf, sub, r);
    if (leaf == 7 && sub == 0) {
        r[1] &= ~L7_EBX_MASK;
        r[2] &= ~L7_ECX_MASK;
        r[3] &= ~L7_EDX_MASK;
    } else if (leaf == 7 && sub == 1) {
        r[0] &= ~L7S1_EAX_MASK;
        r[3] &= ~L7S1_EDX_MASK;
    } else if (leaf == 0xD && sub == 0) {
        r[0] &= ~LD_EAX_MASK;
    } else if (leaf == 0xD && (sub == 5 || sub == 6 || sub == 7 || sub == 17 || sub == 18)) {
        r[0] = r[1] = r[2] = r[3] = 0; /* the state components the mask hides have no size */
    } else if (leaf == 0x24 || leaf == 0x1D || leaf == 0x1E) {
        r[0] = r[1] = r[2] = r[3] = 0; /* AVX10 and AMX tile leaves */
    }
}

static void on_segv(int sig, siginfo_t *info, void *ctx_) {
    ucontext_t *ctx = (ucontext_t *)ctx_;
    greg_t *g = ctx->uc_mcontext.gregs;
    const uint8_t *ip = (const uint8_t *)g[REG_RIP];
    (void)info;
    if (ip != NULL && ip[0] == 0x0F && ip[1] == 0xA2) {
        uint32_t r[4];
        set_cpuid(1);
        masked_cpuid((uint32_t)g[REG_RAX], (uint32_t)g[REG_RCX], r);
        set_cpuid(0);
        /* CPUID zero-extends its 32-bit results into the 64-bit registers. */
        g[REG_RAX] = r[0];
        g[REG_RBX] = r[1];
        g[REG_RCX] = r[2];
        g[REG_RDX] = r[3];
        g[REG_RIP] += 2;
        return;
    }
    /* Not ours: the default action, then the instruction faults again and the process dies as it
     * would have without this library. */
    signal(sig, SIG_DFL);
}

__attribute__((constructor)) static void cpuid_mask_init(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, NULL) != 0) {
        perror("cpuid_avx2_mask: sigaction");
        return;
    }
    if (set_cpuid(0) != 0) {
        perror("cpuid_avx2_mask: arch_prctl(ARCH_SET_CPUID, 0) refused (no CPUID faulting here?)");
        signal(SIGSEGV, SIG_DFL);
        return;
    }
    const char *v = getenv("CPUID_MASK_VERBOSE");
    if (v != NULL && v[0] == '1') {
        uint32_t r[4];
        __asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(7), "c"(0));
        fprintf(stderr, "cpuid_avx2_mask: CPUID faulting on; leaf 7 EBX=%08x ECX=%08x EDX=%08x (AVX512F %s, AVX2 %s)\n",
                r[1], r[2], r[3], (r[1] >> 16) & 1 ? "on" : "off", (r[1] >> 5) & 1 ? "on" : "off");
    }
}
