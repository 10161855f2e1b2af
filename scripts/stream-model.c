// What the two CPUs of this machine allow for a packed in-order ring at batch 32, with
// none of a library's work: the ceiling that `virtq bench`'s streaming figure sits under.
//
// A 256-slot ring of 16-byte descriptors (4 KiB), driver on CPU 0 and device on CPU 1,
// both polling. The driver waits until a batch of slots is free, writes the batch's
// descriptors (the head's flags last) and reaps a batch when the device marks the batch's
// first slot used; the device reads each descriptor in order and marks each batch once.
//
//   cc -O2 -pthread -o /tmp/stream-model scripts/stream-model.c
//   /tmp/stream-model [bookkeeping 0|1] [prefetch 0|1] [buffers]
//
// bookkeeping=1 adds what any driver keeps per buffer in flight (token, length, chain
// shape: seven stores on add, a check and a clear on reap) in private memory; prefetch=1
// asks for the batch's lines with PREFETCHW before writing them (as the packed driver's
// burst add does). Prints M buffers/s. Not part of the test suite: a measurement aid.
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define SLOTS 256
#define BATCH 32
#define AVAIL (1u << 7)
#define USED (1u << 15)

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    _Atomic uint16_t flags;
};

struct in_flight {
    uint64_t token;
    uint64_t present;
    uint32_t writable;
    uint16_t descs, tail, indirect;
    uint8_t mapped;
};

static struct desc ring[SLOTS] __attribute__((aligned(4096)));
static struct in_flight state[SLOTS] __attribute__((aligned(4096)));
static long total __attribute__((aligned(128)));

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static uint16_t avail_flags(unsigned wrap) { return wrap ? AVAIL : USED; }
static uint16_t used_flags(unsigned wrap) { return wrap ? (AVAIL | USED) : 0; }

static void *device(void *arg) {
    (void)arg;
    pin(1);
    unsigned pos = 0, wrap = 1;
    uint64_t sum = 0;
    for (long seen = 0; seen < total;) {
        uint16_t f = atomic_load_explicit(&ring[pos].flags, memory_order_acquire);
        if ((f & (AVAIL | USED)) != avail_flags(wrap))
            continue;
        sum += ring[pos].addr + ring[pos].len;
        seen++;
        unsigned first = pos - (pos % BATCH), first_wrap = wrap;
        if (++pos == SLOTS) {
            pos = 0;
            wrap ^= 1;
        }
        if (seen % BATCH == 0)
            atomic_store_explicit(&ring[first].flags, used_flags(first_wrap), memory_order_release);
    }
    return (void *)(uintptr_t)sum;
}

int main(int argc, char **argv) {
    int bookkeeping = argc > 1 ? atoi(argv[1]) : 0;
    int prefetch = argc > 2 ? atoi(argv[2]) : 0;
    total = argc > 3 ? atol(argv[3]) : 50000000;
    total -= total % BATCH;
    pthread_t t;
    pthread_create(&t, 0, device, 0);
    pin(0);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    long added = 0, reaped = 0;
    unsigned apos = 0, awrap = 1, upos = 0, uwrap = 1;
    uint64_t check = 0;
    while (reaped < total) {
        if (added > reaped &&
            (atomic_load_explicit(&ring[upos].flags, memory_order_acquire) & (AVAIL | USED)) == used_flags(uwrap)) {
            if (bookkeeping)
                for (int i = 0; i < BATCH; i++) {
                    struct in_flight *s = &state[upos + i];
                    if (!s->present)
                        abort();
                    s->present = 0;
                    check += s->token;
                }
            reaped += BATCH;
            if ((upos += BATCH) == SLOTS) {
                upos = 0;
                uwrap ^= 1;
            }
        }
        if (added < total && SLOTS - (added - reaped) >= BATCH) {
            if (prefetch)
                for (int i = 0; i < BATCH; i += 4)
                    __asm__ volatile("prefetchw %0" ::"m"(ring[apos + i]));
            unsigned head = apos;
            for (int i = 0; i < BATCH; i++, apos++) {
                ring[apos].addr = (uint64_t)(added + i);
                ring[apos].len = 64;
                ring[apos].id = (uint16_t)apos;
                if (bookkeeping)
                    state[apos] = (struct in_flight){(uint64_t)(added + i), 1, 64, 1, (uint16_t)apos, 0, 0};
                if (i)
                    atomic_store_explicit(&ring[apos].flags, avail_flags(awrap), memory_order_relaxed);
            }
            atomic_store_explicit(&ring[head].flags, avail_flags(awrap), memory_order_release);
            if (apos == SLOTS) {
                apos = 0;
                awrap ^= 1;
            }
            added += BATCH;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    pthread_join(t, 0);
    double s = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("bookkeeping %d prefetch %d: %.1f M buffers/s (check %llu)\n", bookkeeping, prefetch, (double)total / s / 1e6,
           (unsigned long long)(check & 1));
    return 0;
}
