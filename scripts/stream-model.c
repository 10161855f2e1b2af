// What the two CPUs of this machine allow for streaming at batch 32, with none of a
// library's work: the ceiling that `virtq bench`'s streaming figure sits under.
//
// A 256-entry ring, driver on CPU 0 and device on CPU 1, both polling, the ring kept full:
// the driver adds a batch of 32 single-descriptor buffers whenever 32 are free, and reaps
// what the device has used; the device consumes in order and publishes as virtq's does.
//
//   packed-in-order: 16-byte descriptors, the batch's first flags written last; one used
//     descriptor per batch, marked on the batch's first slot.
//   packed: the same available side, with buffer ids from a free list; the device writes
//     a used descriptor per buffer (id, length, flags), the flags of each line of four
//     together, last first, as virtq's device does; the driver checks each used
//     descriptor's flags and id and returns the id to its free list.
//   split: descriptor table, avail and used rings on pages of their own; descriptors and
//     avail entries stored only when they change (buffer n always goes back into the slot
//     it came from, as in `virtq bench`, so with a pool of one buffer per entry neither
//     changes; with a larger pool each descriptor gets a new address every lap, as with
//     `virtq bench --buffers`), one avail index store per batch; the device
//     writes used elements and publishes `used.idx` every 8 and when it runs dry; the
//     driver keeps a free list of descriptors.
//
//   cc -O2 -pthread -o /tmp/stream-model scripts/stream-model.c
//   /tmp/stream-model packed-in-order|packed|split [bookkeeping 0|1] [prefetch 0|1] [fence 0|1] [buffers] [pool]
//
// bookkeeping=1 adds what any driver keeps per buffer in flight (token, length, chain
// shape: seven stores on add, a check and a clear on reap) in private memory. prefetch=1
// (packed only) asks for the batch's lines with PREFETCHW before writing them, as the
// packed driver's burst add does. fence=1 adds the full barrier that a kick after each
// batch costs (Linux's and virtq's `kick_prepare`, a locked no-op), and the load of the
// device's event that follows it. Prints M buffers/s. Not part of the test suite: a
// measurement aid.
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define SLOTS 256
#define BATCH 32
#define AVAIL (1u << 7)
#define USED (1u << 15)
#define USED_LINE 8

struct packed_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t id;
    _Atomic uint16_t flags;
};

struct split_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags, next;
};

struct used_elem {
    uint32_t id, len;
};

struct in_flight {
    uint64_t token;
    uint64_t present;
    uint32_t writable;
    uint16_t descs, tail, indirect;
    uint8_t mapped;
};

static struct packed_desc packed[SLOTS] __attribute__((aligned(4096)));
static struct split_desc table[SLOTS] __attribute__((aligned(4096)));
static struct {
    uint16_t flags;
    _Atomic uint16_t idx;
    uint16_t ring[SLOTS];
} avail __attribute__((aligned(4096)));
static struct {
    uint16_t flags;
    _Atomic uint16_t idx;
    struct used_elem ring[SLOTS];
} used __attribute__((aligned(4096)));
static struct in_flight state[SLOTS] __attribute__((aligned(4096)));
static uint16_t next_free[SLOTS];
// Packed (not in order): ids the driver may hand out, a stack.
static uint16_t free_ids[SLOTS];
static long total __attribute__((aligned(128)));
static int bookkeeping, prefetch, fence;
// Buffers the driver takes turns with (a multiple of SLOTS): their addresses go into the
// descriptors.
static long pool = SLOTS;

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

// The kick's fence, as `Barriers::mb` does it, then the device event load it orders.
static uint16_t kick_check(const uint16_t *device_event) {
    if (fence)
        __asm__ volatile("lock orq $0, (%%rsp)" ::: "memory", "cc");
    return *(volatile const uint16_t *)device_event;
}

static void track(uint16_t slot, long token) {
    if (bookkeeping)
        state[slot] = (struct in_flight){(uint64_t)token, 1, 64, 1, slot, 0, 0};
}

static uint64_t untrack(uint16_t slot) {
    if (!bookkeeping)
        return 0;
    struct in_flight *s = &state[slot];
    if (!s->present)
        abort();
    s->present = 0;
    return s->token;
}

static uint16_t avail_flags(unsigned wrap) { return wrap ? AVAIL : USED; }
static uint16_t used_flags(unsigned wrap) { return wrap ? (AVAIL | USED) : 0; }

static void *packed_device(void *arg) {
    (void)arg;
    pin(1);
    unsigned pos = 0, wrap = 1;
    uint64_t sum = 0;
    for (long seen = 0; seen < total;) {
        uint16_t f = atomic_load_explicit(&packed[pos].flags, memory_order_acquire);
        if ((f & (AVAIL | USED)) != avail_flags(wrap))
            continue;
        sum += packed[pos].addr + packed[pos].len;
        seen++;
        unsigned first = pos - (pos % BATCH), first_wrap = wrap;
        if (++pos == SLOTS) {
            pos = 0;
            wrap ^= 1;
        }
        if (seen % BATCH == 0)
            atomic_store_explicit(&packed[first].flags, used_flags(first_wrap), memory_order_release);
    }
    return (void *)(uintptr_t)sum;
}

static uint64_t packed_driver(void) {
    long added = 0, reaped = 0;
    unsigned apos = 0, awrap = 1, upos = 0, uwrap = 1;
    uint64_t check = 0;
    uint16_t device_event = 0;
    while (reaped < total) {
        if (added > reaped &&
            (atomic_load_explicit(&packed[upos].flags, memory_order_acquire) & (AVAIL | USED)) == used_flags(uwrap)) {
            for (int i = 0; i < BATCH; i++)
                check += untrack((uint16_t)(upos + i));
            reaped += BATCH;
            if ((upos += BATCH) == SLOTS) {
                upos = 0;
                uwrap ^= 1;
            }
        }
        if (added < total && SLOTS - (added - reaped) >= BATCH) {
            if (prefetch)
                for (int i = 0; i < BATCH; i += 4)
                    __asm__ volatile("prefetchw %0" ::"m"(packed[apos + i]));
            unsigned head = apos;
            for (int i = 0; i < BATCH; i++, apos++) {
                packed[apos].addr = (uint64_t)((added + i) % pool) * 64;
                packed[apos].len = 64;
                packed[apos].id = (uint16_t)apos;
                track((uint16_t)apos, added + i);
                if (i)
                    atomic_store_explicit(&packed[apos].flags, avail_flags(awrap), memory_order_relaxed);
            }
            atomic_store_explicit(&packed[head].flags, avail_flags(awrap), memory_order_release);
            if (apos == SLOTS) {
                apos = 0;
                awrap ^= 1;
            }
            added += BATCH;
            check += kick_check(&device_event);
        }
    }
    return check;
}

static void *packed_used_device(void *arg) {
    (void)arg;
    pin(1);
    unsigned pos = 0, wrap = 1;
    unsigned pending[4], pending_flags[4], npending = 0;
    uint64_t sum = 0;
    for (long seen = 0; seen < total;) {
        uint16_t f = atomic_load_explicit(&packed[pos].flags, memory_order_acquire);
        if ((f & (AVAIL | USED)) != avail_flags(wrap))
            continue;
        sum += packed[pos].addr + packed[pos].len;
        // id and length at the used position (here the same position: one descriptor per
        // buffer); the flags wait for the rest of the line.
        packed[pos].len = 0;
        pending[npending] = pos;
        pending_flags[npending++] = used_flags(wrap);
        seen++;
        if (++pos == SLOTS) {
            pos = 0;
            wrap ^= 1;
        }
        if (npending == 4 || pos % 4 == 0) {
            atomic_thread_fence(memory_order_release);
            while (npending)
                npending--, atomic_store_explicit(&packed[pending[npending]].flags, (uint16_t)pending_flags[npending],
                                                 memory_order_relaxed);
        }
    }
    return (void *)(uintptr_t)sum;
}

static uint64_t packed_used_driver(void) {
    for (int i = 0; i < SLOTS; i++)
        free_ids[i] = (uint16_t)(SLOTS - 1 - i);
    unsigned nfree = SLOTS;
    long added = 0, reaped = 0;
    unsigned apos = 0, awrap = 1, upos = 0, uwrap = 1;
    uint64_t check = 0;
    uint16_t device_event = 0;
    while (reaped < total) {
        while (added > reaped &&
               (atomic_load_explicit(&packed[upos].flags, memory_order_acquire) & (AVAIL | USED)) == used_flags(uwrap)) {
            uint16_t id = packed[upos].id;
            if (id >= SLOTS || packed[upos].len != 0)
                abort();
            check += untrack(id);
            free_ids[nfree++] = id;
            reaped++;
            if (++upos == SLOTS) {
                upos = 0;
                uwrap ^= 1;
            }
        }
        if (added < total && nfree >= BATCH) {
            if (prefetch)
                for (int i = 0; i < BATCH; i += 4)
                    __asm__ volatile("prefetchw %0" ::"m"(packed[(apos + i) % SLOTS]));
            unsigned head = apos, head_wrap = awrap;
            for (int i = 0; i < BATCH; i++) {
                uint16_t id = free_ids[--nfree];
                packed[apos].addr = (uint64_t)((added + i) % pool) * 64;
                packed[apos].len = 64;
                packed[apos].id = id;
                track(id, added + i);
                if (i)
                    atomic_store_explicit(&packed[apos].flags, avail_flags(awrap), memory_order_relaxed);
                if (++apos == SLOTS) {
                    apos = 0;
                    awrap ^= 1;
                }
            }
            atomic_store_explicit(&packed[head].flags, avail_flags(head_wrap), memory_order_release);
            added += BATCH;
            check += kick_check(&device_event);
        }
    }
    return check;
}

static void *split_device(void *arg) {
    (void)arg;
    pin(1);
    uint16_t last_avail = 0, used_idx = 0;
    uint64_t sum = 0;
    for (long seen = 0; seen < total;) {
        uint16_t a = atomic_load_explicit(&avail.idx, memory_order_acquire);
        if (a == last_avail)
            continue;
        while (last_avail != a) {
            uint16_t head = avail.ring[last_avail++ % SLOTS];
            sum += table[head].addr + table[head].len;
            used.ring[used_idx % SLOTS] = (struct used_elem){head, 0};
            used_idx++;
            seen++;
            if (used_idx % USED_LINE == 0)
                atomic_store_explicit(&used.idx, used_idx, memory_order_release);
        }
        atomic_store_explicit(&used.idx, used_idx, memory_order_release);
    }
    return (void *)(uintptr_t)sum;
}

static uint64_t split_driver(void) {
    for (int i = 0; i < SLOTS; i++)
        next_free[i] = (uint16_t)((i + 1) % SLOTS);
    long added = 0, reaped = 0;
    uint16_t avail_idx = 0, last_used = 0, free_head = 0, free_tail = SLOTS - 1;
    unsigned num_free = SLOTS;
    uint64_t check = 0;
    while (reaped < total) {
        uint16_t u = atomic_load_explicit(&used.idx, memory_order_acquire);
        while (last_used != u) {
            struct used_elem e = used.ring[last_used++ % SLOTS];
            if (e.id >= SLOTS || e.len != 0)
                abort();
            check += untrack((uint16_t)e.id);
            if (num_free == 0)
                free_head = (uint16_t)e.id;
            else
                next_free[free_tail] = (uint16_t)e.id;
            free_tail = (uint16_t)e.id;
            num_free++;
            reaped++;
        }
        if (added < total && num_free >= BATCH) {
            for (int i = 0; i < BATCH; i++) {
                uint16_t head = free_head;
                free_head = next_free[head];
                struct split_desc d = {(uint64_t)((added + i) % pool) * 64, 64, 0, next_free[head]};
                if (memcmp(&table[head], &d, sizeof d))
                    table[head] = d;
                track(head, added + i);
                uint16_t *slot = &avail.ring[(uint16_t)(avail_idx + i) % SLOTS];
                if (*slot != head)
                    *slot = head;
            }
            num_free -= BATCH;
            avail_idx += BATCH;
            atomic_store_explicit(&avail.idx, avail_idx, memory_order_release);
            added += BATCH;
            check += kick_check(&used.flags);
        }
    }
    return check;
}

int main(int argc, char **argv) {
    int split = argc > 1 && !strcmp(argv[1], "split");
    int packed_used = argc > 1 && !strcmp(argv[1], "packed");
    if (argc < 2 || (!split && !packed_used && strcmp(argv[1], "packed-in-order"))) {
        fprintf(stderr, "usage: %s packed-in-order|packed|split [bookkeeping] [prefetch] [fence] [buffers] [pool]\n",
                argv[0]);
        return 2;
    }
    bookkeeping = argc > 2 ? atoi(argv[2]) : 0;
    prefetch = argc > 3 ? atoi(argv[3]) : 0;
    fence = argc > 4 ? atoi(argv[4]) : 0;
    total = argc > 5 ? atol(argv[5]) : 30000000;
    pool = argc > 6 ? atol(argv[6]) : SLOTS;
    if (pool < SLOTS || pool % SLOTS) {
        fprintf(stderr, "pool must be a multiple of %d\n", SLOTS);
        return 2;
    }
    total -= total % BATCH;
    pthread_t t;
    pthread_create(&t, 0, split ? split_device : packed_used ? packed_used_device : packed_device, 0);
    pin(0);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint64_t check = split ? split_driver() : packed_used ? packed_used_driver() : packed_driver();
    clock_gettime(CLOCK_MONOTONIC, &t1);
    pthread_join(t, 0);
    double s = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    printf("%s bookkeeping %d prefetch %d fence %d pool %ld: %.1f M buffers/s (check %llu)\n", argv[1], bookkeeping,
           prefetch, fence, pool, (double)total / s / 1e6, (unsigned long long)(check & 1));
    return 0;
}
